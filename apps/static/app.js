// vlsi demo page: no build step, no CDN. Talks to the same server's OpenAI-style API.
"use strict";
const $ = (id) => document.getElementById(id);
let imageDataUrl = null;
let modelId = null;
let stream = null;

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
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) { showError("That is not an image file."); return; }
  const reader = new FileReader();
  reader.onload = () => { showError(""); setImage(reader.result); };
  reader.onerror = () => showError("Could not read the file.");
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => readFile(e.target.files[0]));
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

function renderLayers(layers, finalText) {
  const list = $("layers");
  list.innerHTML = "";
  const entries = Object.entries(layers || {}).sort((a, b) => parseInt(a[0].split("_")[1]) - parseInt(b[0].split("_")[1]));
  for (const [name, text] of entries) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="name"></span><span class="text"></span>`;
    li.querySelector(".name").textContent = name.replace("_", " ");
    li.querySelector(".text").textContent = text || "(nothing)";
    list.appendChild(li);
  }
  const li = document.createElement("li");
  li.className = "final";
  li.innerHTML = `<span class="name">final head</span><span class="text"></span>`;
  li.querySelector(".text").textContent = finalText;
  list.appendChild(li);
}

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("");
  const question = $("question").value.trim();
  if (!question) { showError("Type a question."); return; }
  const content = [];
  if (imageDataUrl) content.push({ type: "image_url", image_url: { url: imageDataUrl } });
  content.push({ type: "text", text: question });
  const body = {
    model: modelId, stream: true, verbalize: true, temperature: 0,
    max_tokens: parseInt($("max-tokens").value, 10) || 64,
    messages: [{ role: "user", content }],
  };
  $("answer").textContent = ""; $("layers").innerHTML = ""; $("stats").textContent = "";
  $("send").disabled = true;
  const t0 = performance.now();
  let first = null, answer = "";
  try {
    let r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (r.status === 400) {
      // an artifact without verbalizers refuses `verbalize`: ask again without it
      const j = await r.clone().json().catch(() => ({}));
      if (j.error && j.error.param === "verbalize") {
        body.verbalize = false;
        r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      }
    }
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error(j.error ? j.error.message : r.statusText); }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", last = null;
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
        const delta = j.choices[0].delta.content;
        if (delta) {
          if (first === null) first = performance.now() - t0;
          answer += delta; $("answer").textContent = answer;
        }
        if (j.usage) last = j;
      }
    }
    if (last) {
      const v = last.vlsi || {};
      const tps = v.tokens_per_s ? v.tokens_per_s.toFixed(1) : "–";
      const ttft = first !== null ? (first / 1000).toFixed(3) : "–";
      $("stats").textContent = `${v.backend} backend · time to first token ${ttft} s · ${tps} tokens/s · ${last.usage.completion_tokens} tokens`;
      renderLayers(last.verbalizations, answer);
      $("output").dataset.done = "1";
    }
  } catch (err) { showError(err.message); }
  finally { $("send").disabled = false; }
});

$("api-key").addEventListener("input", loadModel);
loadModel();
