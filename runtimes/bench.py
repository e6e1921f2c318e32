"""``vlsi bench``: time to first token, decode tokens/s, vision-encoder latency and peak RSS
per backend/precision, each in a fresh process, with ratios to PyTorch eager fp32 measured in
the same run, and the memory-bandwidth roofline beside each decode figure; and the time to first
token of a follow-up question about an image already seen, with and without prefix reuse,
alternating in the same process. With ``rounds`` > 1 the artifacts are measured in turn, round
after round (A, B, A, B, ...), each time in a fresh process, and each one's decode rate is also
given as a ratio to the first artifact's in the same round: on a machine that other jobs load,
those ratios hold where the absolute figures drift. Every llama.cpp and (split) ONNX artifact
is also paired, in its own process, with its engine driven directly on the same files
(llama-cpp-python's ``Llama``; a plain ONNX Runtime loop), alternating: "vlsi / engine" is
what vlsi's backend costs over the engine itself."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlsi.sysinfo import peak_rss_mb


def copy_bandwidth(mb: int = 256, repeats: int = 5, threads: int = 0) -> float:
    """Memory bandwidth in bytes/s: a large copy split over ``threads`` threads (numpy releases
    the GIL while copying), counting the bytes read and the bytes written."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    n = threads or os.cpu_count() or 1
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    parts = np.array_split(np.arange(a.size), n)
    bounds = [(p[0], p[-1] + 1) for p in parts if p.size]
    best = float("inf")
    with ThreadPoolExecutor(n) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda r: np.copyto(b[r[0]:r[1]], a[r[0]:r[1]]), bounds))
            best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def _onnx_decoder_files(m, with_heads: bool) -> list[str]:
    """The decoder graph files of an ONNX manifest: those a decode step runs (segments and LM
    head, or a format-2 artifact's one graph), and with ``with_heads`` the verbalizer heads too."""
    split = m.decoder_split
    if split is None:
        return [m.graph("decoder").file]
    names = [s.graph for s in split.segments] + [split.lm_head.graph]
    if with_heads:
        names += [h.graph for h in split.verbalizers]
    return [m.graph(n).file for n in names]


def _file_bytes(m, files: list[str]) -> int:
    """Bytes of ``files`` in manifest ``m``, their external data (``<file>.data``) included."""
    return sum(e["bytes"] for name, e in m.files.items() if any(name == f or name.startswith(f + ".") for f in files))


def weight_bytes(path: Path) -> int:
    """Bytes of weights a decode step reads: the decoder graph(s), or the checkpoint's text weights."""
    from vlsi.manifest import load_manifest

    path = Path(path)
    if (path / "manifest.json").is_file():
        m = load_manifest(path, verify=False)
        if m.target == "gguf":
            import gguf

            tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path / m.graph("text").file)).tensors}
            if "output.weight" in tensors:  # untied: the embedding is a row lookup
                tensors.pop("token_embd.weight", None)
            return sum(tensors.values())
        if m.target == "onnx":
            return _file_bytes(m, _onnx_decoder_files(m, with_heads=False))
        return _file_bytes(m, [m.graph("decoder").file])
    from safetensors import safe_open

    sizes = {}
    for f in path.glob("model*.safetensors"):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                if "visual" not in k:
                    sizes[k] = int(np.prod(st.get_slice(k).get_shape())) * 4
    # the embedding is a row lookup, unless the LM head is tied to it and reads all of it
    if any(k.endswith("lm_head.weight") for k in sizes):
        sizes = {k: v for k, v in sizes.items() if "embed_tokens" not in k}
    return sum(sizes.values())


def decoder_bytes(path: Path) -> int:
    """Bytes of the text decoder's files on disk, kept verbalizer heads included (an ONNX
    artifact's decoder graphs, a GGUF's text model and verbalizer sidecar); the weights a
    step reads (:func:`weight_bytes`) for anything else."""
    from vlsi.manifest import load_manifest

    path = Path(path)
    if not (path / "manifest.json").is_file():
        return weight_bytes(path)
    m = load_manifest(path, verify=False)
    if m.target == "onnx":
        return _file_bytes(m, _onnx_decoder_files(m, with_heads=True))
    if m.target == "gguf":
        return _file_bytes(m, [m.graph(n).file for n in ("text", "verbalizers") if n in m.graphs])
    return weight_bytes(path)


def _measure(path: str, backend: str, prompt_tokens: int, new_tokens: int, runs: int, threads: int,
             image_size: int = 224) -> dict:
    import vlsi_runtimes
    from PIL import Image

    kw = {"threads": threads} if backend != "torch" and threads else {}
    if backend == "torch" and threads:
        import torch

        torch.set_num_threads(threads)
    rt = vlsi_runtimes.load(path, backend=backend, **kw)
    image = Image.new("RGB", (56, 56), (122, 117, 104))
    prompt = " ".join(["word"] * max(1, prompt_tokens - 30))  # ~prompt_tokens with the chat template
    ttft, tps, vis = [], [], []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        it = rt.stream_tokens([image], prompt, new_tokens, ignore_eos=True, reuse=False)  # a cold prompt
        next(it)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        tps.append((n - 1) / max(t2 - t1, 1e-9))
        t = time.perf_counter()
        rt.image_embeds([image])  # preprocessing included, as a request pays it
        vis.append(time.perf_counter() - t)
    ttft, tps = ttft[1:], tps[1:]  # the first run warms caches
    row = {"path": path, "backend": rt.name, "ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(tps),
           "vision_s": statistics.median(vis[1:]) if len(vis) > 1 else None, "peak_rss_mb": peak_rss_mb()}
    if rt.name == "gguf":
        from .llama_backend import cpu_has_amx

        if cpu_has_amx() and rt.manifest.precision not in ("f32", "f16", "bf16"):
            # llama-cpp-python's Llama segfaults on its first decode of a quantised file there
            row["engine_reference_skipped"] = "CPU with AMX: llama-cpp-python's Llama crashes on quantised types"
        else:
            row.update(_engine_reference(rt, prompt, new_tokens, runs, threads))
    elif rt.name == "onnx" and rt.split is not None:
        row.update(_onnx_engine_reference(rt, prompt, new_tokens, runs, threads))
    row.update(follow_up(rt, runs, image_size))
    return row


def follow_up(rt, runs: int, image_size: int = 224, answer_tokens: int = 16) -> dict:
    """Time to first token of a follow-up question about the image of the first turn: cold (the
    whole conversation prefilled, the image encoded again) and with prefix reuse (the runtime
    served the first turn just before), alternating, medians of ``runs``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((image_size, image_size, 3)) * 255).astype("uint8"))
    first = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe the picture."}]}]
    # the first turn as a chat client gets it, and the follow-up with that answer sent back as
    # text. Where the text does not re-tokenise to the generated ids, reuse stops there, as in
    # llama-server; a trained model's answers do, but random weights say odd things, so the
    # answer is cut to its longest start that does (``followup_answer_tokens``; none: the
    # first turn is served one token, and the follow-up shows an empty answer)
    first_ids = rt.encode(first).ids
    said = [int(t) for t in rt.stream_tokens(first, None, answer_tokens, reuse=False)]

    def conversation(m: int):
        return [*first, {"role": "assistant", "content": rt.decode(said[:m])},
                {"role": "user", "content": "What colour is it?"}]

    keep = next((m for m in range(len(said), 0, -1)
                 if rt.encode(conversation(m)).ids[len(first_ids):len(first_ids) + m] == said[:m]), 0)
    roundtrip = keep == len(said)
    answer_tokens = max(keep, 1)
    prompt = rt.encode(conversation(keep))

    def ttft(reuse: bool) -> tuple[float, int]:
        if reuse:
            list(rt.stream_tokens(first, None, answer_tokens, reuse=False))  # the first turn, served
        else:
            rt.forget()
        stats: dict = {}
        t = time.perf_counter()
        it = rt.stream_tokens(prompt, None, 1, reuse=reuse, stats=stats)
        next(it, None)
        took = time.perf_counter() - t
        it.close()
        return took, stats["cached_tokens"]

    cold, warm, cached = [], [], 0
    for _ in range(runs + 1):
        cold.append(ttft(False)[0])
        took, cached = ttft(True)
        warm.append(took)
    cold_s, warm_s = statistics.median(cold[1:]), statistics.median(warm[1:])
    return {"followup_image_size": image_size, "followup_answer_roundtrip": roundtrip,
            "followup_first_turn_tokens": len(first_ids), "followup_answer_tokens": keep,
            "followup_prompt_tokens": len(prompt.ids), "followup_cached_tokens": cached,
            "followup_image_tokens": sum(n for _, n in prompt.spans), "followup_ttft_cold_s": cold_s,
            "followup_ttft_reused_s": warm_s, "followup_reused_frac": warm_s / cold_s}


def _engine_reference(rt, prompt: str, new_tokens: int, runs: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python's own ``Llama`` on the same file, alternating with
    vlsi's backend in this process (so both see the same machine state): any gap is ours."""
    from llama_cpp import Llama

    m = rt.manifest
    n = threads or rt.threads
    llm = Llama(model_path=str(rt.folder / m.graph("text").file), n_ctx=rt.n_ctx, n_threads=n, n_threads_batch=n,
                verbose=False)
    ids = rt.encode([], prompt).ids

    def engine():
        llm.reset()
        llm.eval(ids)
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        return (new_tokens - 1) / (time.perf_counter() - t)

    return {"engine": "Llama", **_paired(rt, prompt, new_tokens, runs, engine, {})}


def _decode_rate(rt, prompt: str, new_tokens: int) -> tuple[float, list[int]]:
    """Decode tok/s of ``rt`` on a text prompt (the first token, after the prefill, not timed)
    and the tokens it decoded."""
    it = rt.stream_tokens([], rt.encode([], prompt), new_tokens, ignore_eos=True, reuse=False)
    toks = [next(it)]
    t = time.perf_counter()
    toks += list(it)
    return (len(toks) - 1) / (time.perf_counter() - t), toks


def _alternating(one, other, runs: int) -> tuple[list, list]:
    """``runs`` results of each of two measurements, in rounds whose order flips (one first,
    then the other first) so that neither always runs on a cache the other warmed; a first
    round warms up and is dropped."""
    a, b = [], []
    for r in range(runs + 1):
        if r % 2:
            b.append(other())
            a.append(one())
        else:
            a.append(one())
            b.append(other())
    return a[1:], b[1:]


def _paired(rt, prompt: str, new_tokens: int, runs: int, engine, said: dict) -> dict:
    """vlsi's backend and ``engine()`` decoding a text prompt, alternating (:func:`_alternating`)
    -> median decode tok/s of each and the median of the ratios round by round (a round's two
    runs see the same machine state, so a busy moment moves both). ``said["ours"]`` gets the
    backend's tokens."""

    def ours():
        tps, said["ours"] = _decode_rate(rt, prompt, new_tokens)
        return tps

    a, b = _alternating(ours, engine, runs)
    rounds = [x / y for x, y in zip(a, b)]
    return {"paired_decode_tok_s": statistics.median(a), "engine_decode_tok_s": statistics.median(b),
            "x_engine": statistics.median(rounds), "x_engine_rounds": rounds}


def _onnx_engine_reference(rt, prompt: str, new_tokens: int, runs: int, threads: int) -> dict:
    """A plain ONNX Runtime decode loop over the same graph files (embedding, the decoder
    segments, the LM head on the last position, argmax), alternating with vlsi's backend in
    this process: the gap is vlsi's. It drives the backend's own ``InferenceSession`` objects
    (made from those files with plain session options), so both loops read the very same
    weights in memory (no second copy of a 2 GB fp32 decoder) and differ only in the code
    that drives them."""
    m, split = rt.manifest, rt.split
    graphs = {name: m.graph(name) for name in ("embed", *(s.graph for s in split.segments), split.lm_head.graph)}
    sess = {name: rt.sessions[name] for name in graphs}
    ids = np.asarray([rt.encode([], prompt).ids], np.int64)
    axes = rt.spec.position_axes
    shape = (1, rt.kv_heads, 0, rt.head_dim)

    def forward(past, tokens, start):
        h = sess["embed"].run(None, {"input_ids": tokens})[0]
        n = tokens.shape[1]
        feed = {"attention_mask": np.ones((1, start + n), np.int64), "row_wise": np.array(False),
                "position_ids": np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (axes, 1, n)).copy()}
        for s in split.segments:
            g = graphs[s.graph]
            layers = range(s.first_layer - 1, s.last_layer)
            feed[s.hidden_in] = h
            for i in layers:
                feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[i]
            outs = dict(zip(g.outputs, sess[s.graph].run(g.outputs, {k: feed[k] for k in g.inputs})))
            for i in layers:
                past[i] = (outs[f"present_key_{i}"], outs[f"present_value_{i}"])
            h = outs[s.hidden_out]
        head = split.lm_head
        return int(sess[head.graph].run([head.output], {head.input: h[:, -1:]})[0][0, -1].argmax())

    said: dict[str, list[int]] = {}

    def engine():
        empty = np.zeros(shape, np.float32)
        past = [(empty, empty)] * rt.n_layers
        toks = [forward(past, ids, 0)]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            toks.append(forward(past, np.array([[toks[-1]]], np.int64), ids.shape[1] + len(toks) - 1))
        took = time.perf_counter() - t
        said["engine"] = toks
        return (new_tokens - 1) / took

    row = _paired(rt, prompt, new_tokens, runs, engine, said)
    return {"engine": "onnxruntime", **row, "engine_same_tokens": said["engine"] == said["ours"]}


SPEC_PROMPTS = ("Describe a red square next to a blue circle.", "Count the shapes and name their colours.",
                "What is left of the green triangle?", "Tell a short story about three circles.")


def _speculative_ways(rt, spec) -> list[tuple[str, object]]:
    """What ``measure_speculative`` times against plain decoding: ``(name, Speculative)`` for
    vlsi's own loops, ``(name, "tool")`` for llama.cpp's own speculative decoding."""
    from dataclasses import replace

    from vlsi.llama_cpp import speculative_tool

    if rt.name != "gguf":
        return [("vlsi, verbalizer drafter", spec)]
    ways = []
    if spec.layer in rt.verbalizer_layers:
        ways.append(("vlsi, verbalizer drafter", replace(spec, drafter="verbalizer")))
    ways.append(("vlsi, draft model's own head", replace(spec, drafter="model")))
    if speculative_tool() is not None:
        ways.append(("llama.cpp llama-speculative-simple", "tool"))
    return ways


def _cost_terms(rt, spec, reps: int) -> dict:
    """The cost model's terms for drafting as ``spec`` says, each timed on a real state (medians
    of ``reps``), in plain decode steps: a draft step through the drafting layers, its head, a
    verifying pass over m = 1..8 positions."""
    rt._speculation_check(spec)
    state, logits = rt._prefill(rt.encode([], SPEC_PROMPTS[0]))
    tok = int(np.argmax(logits["final"]))

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    step = statistics.median(timed(lambda: rt._step(state, tok))[0] for _ in range(reps))
    rt._rollback(state, rt._fed(state) - reps)
    base = rt._fed(state)
    low, head, verify = [], [], {}
    for _ in range(reps):
        t, h = timed(lambda: rt._draft_feed(state, tok))
        low.append(t)
        head.append(timed(lambda: rt._draft_logits(h))[0])
        rt._verify(state, [h])
        rt._rollback(state, base)
    for m in range(1, 9):
        got = []
        for _ in range(reps):
            fed = [rt._draft_feed(state, tok) for _ in range(m)]
            got.append(timed(lambda: rt._verify(state, fed))[0])
            rt._rollback(state, base)
        verify[m] = statistics.median(got) / step
    return {"step_s": step, "draft_layers_cost": statistics.median(low) / step,
            "draft_head_cost": statistics.median(head) / step, "verify_cost": verify}


def _predicted(costs: dict, cycles: int, drafted: int, accepted: int) -> float:
    """The speedup the cost terms predict for this acceptance: tokens a cycle yields over what
    a cycle costs (draft steps, heads, one verifying pass), in plain steps."""
    cycles = max(cycles, 1)
    drafts = drafted / cycles
    m = min(8, max(1, round(drafts + 1)))
    cost = (drafts + 1) * costs["draft_layers_cost"] + drafts * costs["draft_head_cost"] + costs["verify_cost"][m]
    return (accepted + cycles) / cycles / cost


def measure_speculative(path: str, spec, new_tokens: int, runs: int, threads: int) -> list[dict]:
    """Speculative decoding against plain decoding of the same artifact, in one process,
    alternating on the same prompts: on ONNX, self-speculative decoding with the verbalizer
    drafter; on GGUF, with the verbalizer drafter (when the drafting layer keeps one), with the
    draft model's own norm and head (llama.cpp's usual draft model, at the same depth), and
    llama.cpp's own draft-model speculation (``llama-speculative-simple``) on the same files.
    One row per way: decode tok/s, the speedup over plain in the same run, drafted and accepted
    tokens, the share of prompts answered as plain decoding does, and the cost model (see
    :func:`_cost_terms`) with the speedup it predicts for the acceptance measured."""
    from dataclasses import replace

    import vlsi_runtimes

    from .base import Speculative

    spec = Speculative.of(spec)
    rt = vlsi_runtimes.load(path, **({"threads": threads} if threads else {}))
    rt._speculation_check(spec)
    ways = _speculative_ways(rt, spec)
    rates: dict[str, list[float]] = {"plain": [], **{name: [] for name, _ in ways}}
    same = {name: [] for name, _ in ways}
    totals = {name: {"cycles": 0, "drafted": 0, "accepted": 0} for name, _ in ways}
    for r in range(runs + 1):
        for prompt in SPEC_PROMPTS:
            said = {}
            for name, way in [("plain", None), *ways]:
                stats: dict = {}
                if way == "tool":
                    from vlsi.llama_cpp import run_speculative_tool

                    got = run_speculative_tool(Path(path, rt.manifest.graph("text").file),
                                               Path(path, rt.manifest.graph("draft").file),
                                               rt.chat_text(rt.user_turns([], prompt)), new_tokens, spec.tokens,
                                               threads, spec.min_p, n_ctx=rt.n_ctx)
                    said[name], tps = got["text"], got["tok_s"]
                    stats = {"cycles": got["n_predict"] - got["n_accept"], "drafted": got["n_drafted"],
                             "accepted": got["n_accept"]}
                else:
                    it = rt.stream_tokens([], prompt, new_tokens, ignore_eos=True, reuse=False, stats=stats,
                                          speculative=way)
                    toks = [next(it)]
                    t = time.perf_counter()
                    toks += list(it)
                    tps = (len(toks) - 1) / (time.perf_counter() - t)
                    said[name] = toks
                if r:  # the first round warms up
                    rates[name].append(tps)
                    if name != "plain":
                        for k in totals[name]:
                            totals[name][k] += stats[k]
            if r:
                for name, way in ways:
                    if way == "tool":  # the tool prints text (its last cycle may run past the budget): plain
                        # decoding's pieces must start it
                        same[name].append(said[name].strip("\n").startswith(rt.pieces_text(said["plain"]).strip("\n")))
                    else:
                        same[name].append(said[name] == said["plain"])
    plain_tps = statistics.median(rates["plain"])
    reps = max(3, runs)
    costs = {}
    rows = []
    for name, way in ways:
        drafter = "model" if way == "tool" else way.drafter
        if drafter not in costs:
            costs[drafter] = _cost_terms(rt, replace(spec, drafter=drafter), reps)
        c, t = costs[drafter], totals[name]
        cycles = max(t["cycles"], 1)
        tps = statistics.median(rates[name])
        rows.append({"path": path, "backend": rt.name, "way": name, "drafter": drafter,
                     "precision": rt.manifest.precision, "layer": spec.layer, "tokens": spec.tokens,
                     "min_p": spec.min_p, "plain_tok_s": plain_tps, "speculative_tok_s": tps,
                     "speedup": tps / plain_tps, "identical_rate": sum(same[name]) / len(same[name]),
                     "prompts": len(SPEC_PROMPTS), **t, "accepted_per_cycle": t["accepted"] / cycles,
                     "acceptance": t["accepted"] / max(t["drafted"], 1), **c,
                     "predicted_speedup": _predicted(c, t["cycles"], t["drafted"], t["accepted"])})
    return rows


def format_speculative(rows: list[dict]) -> str:
    lines = ["| artifact | way | precision | layer | draft tokens | min p | plain tok/s | speculative tok/s | speedup | "
             "identical to plain | drafted | accepted | accepted / cycle | predicted speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['path']} | {r.get('way', 'vlsi, verbalizer drafter')} | {r['precision']} | {r['layer']} | "
              f"{r['tokens']} | {r['min_p']} | {r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {100 * r['identical_rate']:.0f}% | {r['drafted']} | {r['accepted']} | "
              f"{r['accepted_per_cycle']:.2f} | {r['predicted_speedup']:.2f}x |" for r in rows]
    lines += ["", "Cost model, in plain decode steps: a draft step (the layers up to the drafting one; its head) and "
                  "a verifying pass of the layers above over m positions (llama.cpp: the whole model over m "
                  "positions; llama.cpp's own tool is predicted with the draft model's costs):", "",
              "| artifact | drafter | plain step ms | draft layers | draft head | " +
              " | ".join(f"verify {m}" for m in range(1, 9)) + " |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in range(8)) + " |"]
    seen = set()
    for r in rows:
        key = (r["path"], r.get("drafter", "verbalizer"))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['path']} | {key[1]} | {1e3 * r['step_s']:.1f} | {r['draft_layers_cost']:.2f} | "
                     f"{r['draft_head_cost']:.2f} | " + " | ".join(f"{r['verify_cost'][m]:.2f}" for m in range(1, 9)) +
                     " |")
    return "\n".join(lines)


def measure_kept_heads(plain: str, kept: str, new_tokens: int = 64, runs: int = 11, threads: int = 0) -> dict:
    """Decode tok/s of an artifact exported without verbalizers (``plain``) and of the same model
    exported with them (``kept``), plain decoding (no head asked for), in this one process: the two
    loaded side by side and alternating, the order flipping each round, the ratio kept / plain taken
    round by round. Done twice, loading ``plain`` first and then ``kept`` first: on this 2-core
    machine the model loaded second decoded 2-6% faster whatever it was (the same file loaded twice:
    1.02), so the figure is the geometric mean of the two orders' medians, which cancels that."""
    import vlsi_runtimes
    from vlsi.manifest import load_manifest

    prompt = " ".join(["word"] * 34)
    kw = {"threads": threads} if threads else {}

    def rate(rt, said: list):
        def run():
            tps, toks = _decode_rate(rt, prompt, new_tokens)
            said.append(toks)
            return tps
        return run

    orders = []
    for first, second in ((plain, kept), (kept, plain)):
        rts = {first: vlsi_runtimes.load(first, **kw)}
        rts[second] = vlsi_runtimes.load(second, **kw)
        said: dict = {plain: [], kept: []}
        p_tps, k_tps = _alternating(rate(rts[plain], said[plain]), rate(rts[kept], said[kept]), runs)
        rounds = [k / p for p, k in zip(p_tps, k_tps)]
        orders.append({"loaded_first": "plain" if first == plain else "kept",
                       "plain_tok_s": statistics.median(p_tps), "kept_tok_s": statistics.median(k_tps),
                       "x_plain": statistics.median(rounds), "rounds_x_plain": rounds,
                       "same_tokens": said[plain] == said[kept]})
        for rt in rts.values():
            close = getattr(rt, "close", None)
            if close is not None:
                close()
        del rts
    m = load_manifest(kept, verify=False)
    return {"plain": plain, "kept": kept, "backend": m.target, "precision": m.precision,
            "verbalizers": list(m.verbalizers), "orders": orders,
            "x_plain": math.sqrt(orders[0]["x_plain"] * orders[1]["x_plain"])}


def format_kept_heads(row: dict) -> str:
    lines = [f"Kept verbalizers not asked for ({row['kept']}, heads {row['verbalizers']}) against the artifact "
             f"without them ({row['plain']}), {row['backend']} {row['precision']}, plain decoding, one process, "
             "alternating:", "",
             "| loaded first | plain tok/s | kept tok/s | kept / plain (median of rounds) | per round | same tokens |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {o['loaded_first']} | {o['plain_tok_s']:.1f} | {o['kept_tok_s']:.1f} | {o['x_plain']:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in o['rounds_x_plain'])} | {o['same_tokens']} |" for o in row["orders"]]
    lines += ["", f"kept / plain, both load orders (geometric mean): {row['x_plain']:.3f}"]
    return "\n".join(lines)


def _run_one(path: str, backend: str, prompt_tokens, new_tokens, runs, threads, image_size) -> dict:
    """One measurement in a fresh process."""
    cmd = [sys.executable, "-m", "vlsi_runtimes.bench", path, backend, str(prompt_tokens), str(new_tokens),
           str(runs), str(threads), str(image_size)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench of {path} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _merge(rounds: list[dict]) -> dict:
    """One row from an artifact's rounds: medians of the timings, the largest peak RSS."""
    row = dict(rounds[len(rounds) // 2])
    for k, v in rounds[0].items():
        if isinstance(v, float) and k != "peak_rss_mb":
            row[k] = statistics.median(r[k] for r in rounds)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    row["rounds_decode_tok_s"] = [r["decode_tok_s"] for r in rounds]
    return row


def bench(artifacts: list, reference, prompt_tokens: int = 64, new_tokens: int = 64, runs: int = 5,
          threads: int = 0, image_size: int = 224, rounds: int = 1) -> list[dict]:
    """Benchmark the reference checkpoint (PyTorch eager fp32) and every artifact; ``rounds``
    times each artifact, alternating (see the module's docstring)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    bw = copy_bandwidth(threads=threads)
    args = (prompt_tokens, new_tokens, runs, threads, image_size)
    measured = {str(reference): [_run_one(str(reference), "torch", *args)]}
    for _ in range(rounds):
        for a in artifacts:
            measured.setdefault(str(a), []).append(_run_one(str(a), "auto", *args))
    rows = []
    for path, got in measured.items():
        row = _merge(got)
        row["weights_mb"] = weight_bytes(Path(path)) / 2**20
        row["decoder_mb"] = decoder_bytes(Path(path)) / 2**20
        row["roofline_tok_s"] = bw / max(1, weight_bytes(Path(path)))
        if Path(path, "manifest.json").is_file():
            from vlsi.manifest import load_manifest

            m = load_manifest(path, verify=False)
            row["precision"] = m.precision
            row["verbalizers"] = list(m.verbalizers)
        else:
            row["precision"] = "fp32"
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["x_decode_vs_torch"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["x_ttft_vs_torch"] = base["ttft_s"] / r["ttft_s"]
        r["roofline_frac"] = r["decode_tok_s"] / r["roofline_tok_s"]
        r["copy_bandwidth_gb_s"] = bw / 1e9
    if len(rows) > 2 and rounds > 1:  # each artifact against the first one, round by round
        first = rows[1]["rounds_decode_tok_s"]
        for r in rows[1:]:
            r["rounds_x_first"] = [a / b for a, b in zip(r["rounds_decode_tok_s"], first)]
            r["x_first_median"] = statistics.median(r["rounds_x_first"])
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| backend | precision | verbalizers | weights MB | decoder files MB | TTFT s | decode tok/s | x PyTorch | "
             "roofline tok/s | % of roofline | vision s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vis = f"{r['vision_s']:.4f}" if r.get("vision_s") is not None else "-"
        verbs = ",".join(map(str, r.get("verbalizers", []))) or "-"
        lines.append(f"| {r['backend']} | {r['precision']} | {verbs} | {r['weights_mb']:.1f} | {r['decoder_mb']:.1f} | "
                     f"{r['ttft_s']:.4f} | {r['decode_tok_s']:.1f} | {r['x_decode_vs_torch']:.2f} | "
                     f"{r['roofline_tok_s']:.0f} | {100 * r['roofline_frac']:.0f}% | {vis} | {r['peak_rss_mb']:.0f} |")
    alternated = [r for r in rows if "rounds_x_first" in r]
    if alternated:
        lines += ["", f"Decode tok/s round by round (artifacts alternating, each in a fresh process), and the ratio to "
                      f"the first artifact ({alternated[0]['path']}) in the same round:", "",
                  "| artifact | tok/s per round | x first per round | median x first |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['path']} | {', '.join(f'{v:.1f}' for v in r['rounds_decode_tok_s'])} | "
                  f"{', '.join(f'{v:.3f}' for v in r['rounds_x_first'])} | {r['x_first_median']:.3f} |"
                  for r in alternated]
    paired = [r for r in rows if "x_engine" in r]
    if paired:
        lines += ["", "Each artifact against its engine driven directly on the same files (llama-cpp-python's own "
                      "`Llama`; a plain ONNX Runtime loop driving the same sessions), text prompt, "
                      "alternating in one process (the order flipping each round); vlsi / engine is the median of the ratios "
                      "round by round:", "",
                  "| backend | precision | verbalizers | vlsi backend tok/s | engine | engine tok/s | vlsi / engine | "
                  "per round |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['backend']} | {r['precision']} | {','.join(map(str, r.get('verbalizers', []))) or '-'} | "
                  f"{r['paired_decode_tok_s']:.1f} | {r.get('engine', 'Llama')} | {r['engine_decode_tok_s']:.1f} | "
                  f"{100 * r['x_engine']:.0f}% | {', '.join(f'{100 * v:.0f}%' for v in r['x_engine_rounds'])} |"
                  for r in paired]
    follow = [r for r in rows if "followup_ttft_cold_s" in r]
    if follow:
        lines += ["", f"Follow-up question about an image already seen ({follow[0]['followup_image_size']} px, "
                      f"{follow[0]['followup_image_tokens']} image tokens), time to first token, cold vs reusing "
                      "the first turn's KV cache, alternating:", "",
                  "| backend | precision | prompt tokens | cached | TTFT cold s | TTFT reused s | reused / cold |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['backend']} | {r['precision']} | {r['followup_prompt_tokens']} | {r['followup_cached_tokens']} | "
                  f"{r['followup_ttft_cold_s']:.4f} | {r['followup_ttft_reused_s']:.4f} | "
                  f"{100 * r['followup_reused_frac']:.0f}% |" for r in follow]
    lines.append(f"\ncopy bandwidth {rows[0]['copy_bandwidth_gb_s']:.1f} GB/s")
    return "\n".join(lines)


def _run_speculative(path: str, spec, new_tokens: int, runs: int, threads: int) -> list[dict]:
    """:func:`measure_speculative` in a fresh process."""
    cmd = [sys.executable, "-m", "vlsi_runtimes.bench", "speculative", path, json.dumps(spec), str(new_tokens),
           str(runs), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"speculative bench of {path} failed:\n{res.stderr[-2000:]}")
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for row in rows:
        row["verify_cost"] = {int(k): v for k, v in row["verify_cost"].items()}
    return rows


if __name__ == "__main__" and sys.argv[1] == "kept-heads":
    plain_path, kept_path, nt, runs, threads = sys.argv[2:7]
    print(format_kept_heads(measure_kept_heads(plain_path, kept_path, int(nt), int(runs), int(threads))))
elif __name__ == "__main__" and sys.argv[1] == "speculative":
    p, spec, nt, runs, threads = sys.argv[2:7]
    print(json.dumps(measure_speculative(p, json.loads(spec), int(nt), int(runs), int(threads))))
elif __name__ == "__main__":
    p, backend, pt, nt, runs, threads, size = sys.argv[1:8]
    print(json.dumps(_measure(p, backend, int(pt), int(nt), int(runs), int(threads), int(size))))
