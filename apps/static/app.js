// vlsi demo page: no build step, no CDN. Talks to the same server's OpenAI-style API.
// The page keeps the conversation and sends all of it with every question: each image stays
// in the user turn it was attached to, earlier answers go back as assistant turns.
"use strict";
const $ = (id) => document.getElementById(id);
let imageDataUrl = null; // staged for the next question
let modelId = null;
let stream = null;
const history = []; // the OpenAI messages of the finished turns
let inflight = null; // AbortController of the running request; .why = "stop" or "new"
let answers = 0;

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    const m = j.data[0];
    modelId = m.id;
    $("model").textContent = `${m.id} · ${m.backend} backend · verbalizer layers: ${m.verbalizer_layers.join(", ") || "none"}`;
  } catch (e) { $("model").textContent = "model info unavailable: " + e.message; }
}

function setImage(dataUrl) {
  imageDataUrl = dataUrl;
  const img = $("preview");
  img.src = dataUrl || "";
  img.hidden = !dataUrl;
  $("clear").hidden = !dataUrl;
  $("drop-hint").hidden = !!dataUrl;
  $("drop-hint").textContent = $("chat").children.length ? "Add an image to the next question: drop, paste, or"
    : "Drop an image here, paste one, or";
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) { showError("That is not an image file."); return; }
  const reader = new FileReader();
  reader.onload = () => { showError(""); setImage(reader.result); };
  reader.onerror = () => showError("Could not read the file.");
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => { readFile(e.target.files[0]); e.target.value = ""; });
$("clear").addEventListener("click", () => setImage(null));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); readFile(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.type.startsWith("image/")) { readFile(item.getAsFile()); e.preventDefault(); return; }
  }
});

$("camera-btn").addEventListener("click", async () => {
  const video = $("camera");
  if (stream) { stopCamera(); return; }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
    video.srcObject = stream; video.hidden = false; $("snap").hidden = false; await video.play();
  } catch (e) { showError("Camera unavailable: " + e.message); }
});
function stopCamera() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null; $("camera").hidden = true; $("snap").hidden = true;
}
$("snap").addEventListener("click", () => {
  const video = $("camera");
  const c = document.createElement("canvas");
  c.width = video.videoWidth; c.height = video.videoHeight;
  c.getContext("2d").drawImage(video, 0, 0);
  setImage(c.toDataURL("image/png"));
  stopCamera();
});

function addTurn(role, text, image) {
  const li = document.createElement("li");
  li.className = "turn " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  li.appendChild(who);
  if (image) {
    const img = document.createElement("img");
    img.className = "thumb"; img.src = image; img.alt = "attached image";
    li.appendChild(img);
  }
  const p = document.createElement("p");
  p.className = "text"; p.textContent = text;
  li.appendChild(p);
  $("chat").appendChild(li);
  $("empty").hidden = true;
  return li;
}

function renderLayers(layers, finalText) {
  const list = $("layers");
  list.replaceChildren();
  const entries = Object.entries(layers || {}).sort((a, b) => parseInt(a[0].split("_")[1]) - parseInt(b[0].split("_")[1]));
  const row = (name, text, cls) => {
    const li = document.createElement("li");
    if (cls) li.className = cls;
    for (const [c, t] of [["name", name], ["text", text]]) {
      const s = document.createElement("span");
      s.className = c; s.textContent = t;
      li.appendChild(s);
    }
    list.appendChild(li);
  };
  for (const [name, text] of entries) row(name.replace("_", " "), text || "(nothing)");
  row("final head", finalText, "final");
}

function statsLine(usage, v, first) {
  const tps = v.tokens_per_s ? v.tokens_per_s.toFixed(1) : "–";
  const ttft = first !== null ? (first / 1000).toFixed(3) : "–";
  let s = `${v.backend || "?"} backend · time to first token ${ttft} s · ${tps} tokens/s · ${usage.completion_tokens} tokens`;
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : null;
  if (typeof cached === "number") s += ` · ${usage.prompt_tokens} prompt tokens, ${cached} cached`;
  const sp = v.speculative;
  if (sp && sp.cycles) s += ` · drafting at layer ${sp.layer}: ${sp.accepted_per_cycle.toFixed(2)} accepted per cycle (${sp.accepted} of ${sp.drafted})`;
  return s;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("chat").setAttribute("aria-busy", busy ? "true" : "false");
}

$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("ask").requestSubmit(); }
});

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (inflight) return;
  showError("");
  const question = $("question").value.trim();
  if (!question) { showError("Type a question."); return; }
  const image = imageDataUrl;
  const content = [];
  if (image) content.push({ type: "image_url", image_url: { url: image } });
  content.push({ type: "text", text: question });
  const turn = { role: "user", content };
  const body = {
    model: modelId, stream: true, stream_options: { include_usage: true }, verbalize: true, temperature: 0,
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    messages: [...history, turn],
  };
  const userLi = addTurn("user", question, image);
  const botLi = addTurn("assistant", "");
  botLi.classList.add("pending");
  const out = botLi.querySelector(".text");
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
  $("question").value = ""; setImage(null);
  $("layers").replaceChildren(); $("stats").textContent = "";
  $("output").dataset.done = "0";
  const ctl = new AbortController();
  inflight = ctl;
  setBusy(true);
  const t0 = performance.now();
  let first = null, answer = "", usage = null, vlsi = {}, layers = null;
  const post = () => fetch("/v1/chat/completions",
    { method: "POST", headers: headers(), body: JSON.stringify(body), signal: ctl.signal });
  try {
    let r = await post();
    if (r.status === 400) {
      // an artifact without verbalizers refuses `verbalize`: ask again without it
      const j = await r.clone().json().catch(() => ({}));
      if (j.error && j.error.param === "verbalize") { body.verbalize = false; r = await post(); }
    }
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(j.error ? j.error.message : r.statusText); }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        const choice = (j.choices || [])[0];
        const delta = choice && choice.delta ? choice.delta.content : null;
        if (delta) {
          if (first === null) first = performance.now() - t0;
          answer += delta; out.textContent = answer;
          chat.scrollTop = chat.scrollHeight;
        }
        if (j.usage) usage = j.usage; // with include_usage it may come in a chunk of its own
        if (j.vlsi) vlsi = j.vlsi;
        if (j.verbalizations) layers = j.verbalizations;
      }
    }
    history.push(turn, { role: "assistant", content: answer });
    botLi.classList.remove("pending");
    if (!answer) botLi.classList.add("empty");
    if (usage) $("stats").textContent = statsLine(usage, vlsi, first);
    renderLayers(layers, answer);
    $("output").dataset.answers = String(++answers);
    $("output").dataset.done = "1";
  } catch (err) {
    if (ctl.signal.aborted && ctl.why === "new") return; // "New chat" already cleared the page
    botLi.classList.remove("pending");
    if (ctl.signal.aborted && answer) { // stopped: keep what came so far
      history.push(turn, { role: "assistant", content: answer });
      botLi.classList.add("stopped");
      $("stats").textContent = "stopped";
      return;
    }
    // nothing to keep: take the question back so it can be sent again
    userLi.remove(); botLi.remove();
    $("empty").hidden = history.length > 0;
    $("question").value = question;
    if (image && !imageDataUrl) setImage(image);
    if (!ctl.signal.aborted) showError(err.message);
  } finally {
    if (inflight === ctl) { inflight = null; setBusy(false); }
  }
});

$("stop").addEventListener("click", () => { if (inflight) { inflight.why = "stop"; inflight.abort(); } });

$("new-chat").addEventListener("click", () => {
  if (inflight) { inflight.why = "new"; inflight.abort(); inflight = null; }
  history.length = 0; answers = 0;
  $("chat").replaceChildren(); $("empty").hidden = false;
  stopCamera(); setImage(null); showError("");
  $("layers").replaceChildren(); $("stats").textContent = "";
  delete $("output").dataset.done;
  $("output").dataset.answers = "0";
  setBusy(false);
  $("question").focus();
});

$("api-key").addEventListener("input", loadModel);
loadModel();
