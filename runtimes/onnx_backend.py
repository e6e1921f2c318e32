"""ONNX Runtime backend, for every architecture the ONNX target exports. Imports neither torch
nor transformers: an edge install is ``tokenizers`` + numpy + Pillow + onnxruntime.

Everything architecture-specific (image marker, preprocessing, the vision graph's inputs,
position ids) comes from the architecture's torch-free spec, named by the manifest; graph
inputs and outputs are fed and read by the names the manifest lists.

The decoder is the chain of segments the manifest's ``decoder_split`` lists, then the LM head
on the last position; each segment's hidden state at a kept verbalizer layer is captured, and
that verbalizer's head graph (and the LM head) runs on it only when its logits are read. An
artifact of format 2 (one ``decoder`` graph returning every head's logits) still runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsi.archs import get_spec
from vlsi.manifest import ArtifactError, load_manifest

from vlsi.errors import ConfigError

from .base import LayerLogits, SpecRuntime


def default_providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build has."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxRuntime(SpecRuntime):
    name = "onnx"

    def __init__(self, folder, providers: list[str] | None = None, threads: int = 0, parity: bool = False):
        """``parity`` changes nothing here: the graphs' caches are fp32 at every precision."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = m = load_manifest(self.folder)
        if m.target != "onnx":
            raise ArtifactError(f"{self.folder} is a {m.target!r} artifact, not an ONNX one")
        self.model = m.model
        self.spec = get_spec(m.arch)
        self.image_spec = self.spec.image_spec(self.folder)
        self.n_layers, self.kv_heads, self.head_dim = m.model["num_layers"], m.model["num_kv_heads"], m.model["head_dim"]
        self.image_token_id = m.model["image_token_id"]
        self.context_length = m.model.get("max_position_embeddings")  # None in artifacts from before it was recorded
        self.verbalizer_layers = tuple(m.verbalizers)
        self.eos_ids = tuple(m.eos_token_ids)
        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._options = opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # A step runs several sessions in turn (embedding, decoder segments, LM head, heads when
        # asked), each with its own thread pool: workers left spinning after one session's run
        # take the cores from the next. They spin within a run and stop at its end. Measured on
        # the 0.5B shape, int8, 2 threads, decode tok/s plain / with three kept heads: 18 / 9
        # spinning (ONNX Runtime's default), 35 / 34 never spinning, 39 / 38 stopping at each end.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.providers = providers or default_providers()
        self.split = m.decoder_split
        self._invariant: bool | None = None  # see _rows_invariant
        if self.split is None:  # format 2: one decoder graph that computes every kept head at every step
            eager, self._heads = ("vision", "embed", "decoder"), {}
        else:
            eager = ("vision", "embed", *(s.graph for s in self.split.segments), self.split.lm_head.graph)
            self._heads = {h.layer: h for h in self.split.verbalizers}
        lazy = [h.graph for h in self._heads.values()]
        if self.split is not None and self.split.draft_head is not None:
            lazy.append(self.split.draft_head.graph)
            self._draft_ids = np.asarray(self.split.draft_vocab, np.int64)
        self.graphs = {name: m.graph(name) for name in (*eager, *lazy)}
        self.sessions = {name: self._open(name) for name in eager}  # head graphs open when first asked for
        self._check_decoder()

    def _open(self, name: str):
        import onnxruntime as ort

        return ort.InferenceSession(str(self.folder / self.graphs[name].file), self._options, providers=self.providers)

    def _check_decoder(self) -> None:
        """The decoder graphs chain up and serve every kept verbalizer, or the artifact is refused."""
        where = f"{self.folder}: "
        if self.split is None:
            outs = set(self.graphs["decoder"].outputs)
            want = {"logits", *(f"verbalizer_logits_{k}" for k in self.verbalizer_layers),
                    *(f"present_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value"))}
            if want - outs:
                raise ArtifactError(f"{where}decoder.onnx lacks outputs {sorted(want - outs)[:4]}; re-export it")
            return
        fix = "; re-export it (`vlsi export --target onnx ...`)"
        at, hidden = 1, "inputs_embeds"
        for seg in self.split.segments:
            g = self.graphs[seg.graph]
            if seg.first_layer != at or seg.last_layer < seg.first_layer or seg.hidden_in != hidden:
                raise ArtifactError(f"{where}decoder segment {seg.graph} (layers {seg.first_layer}..{seg.last_layer}, "
                                    f"from {seg.hidden_in}) does not continue the one before it{fix}")
            past = [f"past_{kind}_{i}" for i in range(seg.first_layer - 1, seg.last_layer) for kind in ("key", "value")]
            lacking = [n for n in (seg.hidden_in, *past) if n not in g.inputs]
            lacking += [n for n in (seg.hidden_out, *(p.replace("past_", "present_") for p in past)) if n not in g.outputs]
            if lacking:
                raise ArtifactError(f"{where}{g.file} lacks {lacking[:4]}{fix}")
            at, hidden = seg.last_layer + 1, seg.hidden_out
        if at != self.n_layers + 1:
            raise ArtifactError(f"{where}the decoder segments end at layer {at - 1} of {self.n_layers}{fix}")
        ends = {s.last_layer for s in self.split.segments}
        missing = [k for k in self.verbalizer_layers if k not in self._heads or k not in ends]
        if missing:
            raise ArtifactError(f"{where}verbalizer layers {missing} have no head graph or no segment ending there{fix}")

    # ------------------------------------------------------------------ pieces
    def _run_graph(self, name: str, feeds: dict) -> dict[str, np.ndarray]:
        """Run graph ``name`` on the inputs it lists; its outputs by name."""
        g = self.graphs[name]
        missing = [n for n in g.inputs if n not in feeds]
        if missing:
            raise ArtifactError(f"{name}.onnx takes inputs {missing} that {self.spec.name}'s spec did not make; "
                                "the artifact and this vlsi disagree: re-export it")
        session = self.sessions.get(name)
        if session is None:
            session = self.sessions[name] = self._open(name)
        return dict(zip(g.outputs, session.run(g.outputs, {n: feeds[n] for n in g.inputs})))

    def _vision(self, vision) -> np.ndarray:
        return self._run_graph("vision", vision.feeds)["image_embeds"]

    def _segments(self, segments, past: list, h: np.ndarray, cached: int, positions, captured=None,
                  row_wise: bool = False) -> np.ndarray:
        """Run ``segments`` in turn on ``h (1, T, D)`` after ``cached`` positions, updating their
        layers' entries of ``past``; -> the last one's hidden state. ``captured`` receives the
        last position's state after each kept verbalizer layer. ``row_wise``: attend row by row
        (verifying drafts; segments exported before that input attend so whenever T <= 16)."""
        mask = np.ones((1, cached + h.shape[1]), np.int64)
        for seg in segments:
            feed = {seg.hidden_in: h, "attention_mask": mask, "position_ids": positions,
                    "row_wise": np.array(row_wise)}
            layers = range(seg.first_layer - 1, seg.last_layer)
            for i in layers:
                feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[i]
            outs = self._run_graph(seg.graph, feed)
            for i in layers:
                past[i] = (outs[f"present_key_{i}"], outs[f"present_value_{i}"])
            h = outs[seg.hidden_out]
            if captured is not None and seg.last_layer in self._heads:
                captured[seg.last_layer] = np.ascontiguousarray(h[:, -1:])
        return h

    def _forward(self, state, embeds, positions):
        embeds = embeds.astype(np.float32, copy=False)
        if self.split is None:
            mask = np.ones((1, state["length"] + embeds.shape[1]), np.int64)
            return self._forward_one_graph(state, embeds, mask, positions)
        past, captured = list(state["past"]), {}
        h = self._segments(self.split.segments, past, embeds, state["length"], positions,
                           captured if self.capture_layers else None)
        state["past"] = past
        state["length"] += embeds.shape[1]
        final = self._lm_head(np.ascontiguousarray(h[:, -1:]))
        return LayerLogits(final, self.verbalizer_layers, lambda k: self._verbalizer(k, self._captured(captured, k)))

    @staticmethod
    def _captured(captured: dict, layer: int) -> np.ndarray:
        if layer not in captured:
            raise RuntimeError(f"layer {layer}'s state was not kept for this step (capture_layers was off)")
        return captured[layer]

    def _head_rows(self, normed: np.ndarray) -> np.ndarray:
        """``(1, T, D)`` states after a final or verbalizer norm -> their ``(T, V)`` logits."""
        head = self.split.lm_head
        return self._run_graph(head.graph, {head.input: normed})[head.output][0]

    def _lm_head(self, normed: np.ndarray) -> np.ndarray:
        """The last of :meth:`_head_rows`: the next token's ``(V,)`` logits."""
        return self._head_rows(normed)[-1]

    def _verbalizer(self, layer: int, hidden: np.ndarray) -> np.ndarray:
        """Verbalizer ``layer``'s logits from the hidden state captured after that layer."""
        head = self._heads[layer]
        return self._lm_head(self._run_graph(head.graph, {head.input: hidden})[head.output])

    def _forward_one_graph(self, state, embeds, mask, positions):
        """A format-2 artifact's single decoder graph (every kept head computed at every step)."""
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = state["past"][i]
        outs = self._run_graph("decoder", feed)
        state["past"] = [(outs[f"present_key_{i}"], outs[f"present_value_{i}"]) for i in range(self.n_layers)]
        state["length"] += embeds.shape[1]
        return LayerLogits(outs["logits"][0], self.verbalizer_layers, lambda k: outs[f"verbalizer_logits_{k}"][0])

    # ------------------------------------------------------------------ self-speculative decoding
    EXACT = ("fp32", "int8-nbits", "int4")
    """Precisions whose weight products can be batch-invariant (fp32 MatMul, MatMulNBits at
    accuracy level 4): with row-by-row attention, a verifying pass then equals one-by-one decoding
    bit for bit. Whether they are depends on the kernels ONNX Runtime picks for this CPU, so
    :meth:`_rows_invariant` checks it on the artifact before speculating."""

    def _rows_invariant(self) -> bool:
        """Whether the LM head graph (the decoder's weight product at its largest: the same op,
        precision and block size as the segments') gives each row of a 3-row batch exactly what
        that row gives alone, on this machine. Not everywhere so: int4 MatMulNBits gives one row
        another result than several on an AVX2-only EPYC (its one-row kernel), the same on an
        AVX-512 Xeon; fp32 and 8-bit agree on both. Checked once per runtime."""
        if self._invariant is None:
            x = np.random.default_rng(0).standard_normal((1, 3, self.model["hidden_size"])).astype(np.float32)
            rows = self._head_rows(x)
            self._invariant = all(np.array_equal(self._head_rows(x[:, t:t + 1])[0], rows[t]) for t in range(3))
        return self._invariant

    def _speculation_check(self, spec) -> None:
        where = f"{self.folder}: "
        if spec.drafter != "verbalizer":
            raise ConfigError(f"speculative drafter={spec.drafter!r} runs a truncated draft model, which the llama.cpp "
                              "backend has (--target gguf --draft-layer); ONNX drafts with a kept verbalizer head")
        if self.split is None or not self.split.row_wise_rows:
            raise ConfigError(f"{where}this artifact's decoder cannot verify drafted tokens exactly (exported before "
                              "row-wise attention); re-export it (`vlsi export --target onnx ...`)")
        if spec.layer >= self.n_layers:
            raise ConfigError(f"speculative layer {spec.layer}: drafting with every layer saves nothing; pick a "
                              f"shallower kept layer ({[k for k in self.verbalizer_layers if k < self.n_layers]})")
        if spec.layer not in self._heads:
            raise ConfigError(f"speculative layer {spec.layer} has no verbalizer head in {self.folder} (kept: "
                              f"{list(self.verbalizer_layers)}); export with --verbalizers or pick a kept layer")
        if spec.tokens > self.split.row_wise_rows - 1:
            raise ConfigError(f"speculative tokens={spec.tokens}: this artifact verifies at most "
                              f"{self.split.row_wise_rows - 1} drafted tokens per cycle")
        precision = self.manifest.precision
        if precision not in self.EXACT:
            raise ConfigError(f"{where}speculative decoding on {precision!r} would not give plain decoding's tokens "
                              f"(its weight products are not batch-invariant); export with --quant "
                              f"{' or '.join(self.EXACT)}")
        if not self._rows_invariant():
            others = [p for p in self.EXACT if p != precision]
            raise ConfigError(f"{where}speculative decoding on {precision!r} would not give plain decoding's tokens on "
                              f"this CPU: ONNX Runtime's {precision} weight products give one row another result than "
                              f"a batch of rows here (checked on {self.graphs[self.split.lm_head.graph].file}); export "
                              f"with --quant {' or '.join(others)}")
        self._draft_layer = spec.layer
        cut = [i for i, seg in enumerate(self.split.segments) if seg.last_layer == spec.layer][0] + 1
        self._lower, self._upper = self.split.segments[:cut], self.split.segments[cut:]

    def _fed(self, state) -> int:
        return state["length"]

    def _draft_feed(self, state, token: int) -> np.ndarray:
        """``state["drafted"]``: positions the drafting layers hold beyond ``state["length"]``."""
        drafted = state.get("drafted", 0)
        emb = self._embed_tokens(np.array([[token]], np.int64))
        pos = np.full((self.spec.position_axes, 1, 1), state["next_pos"] + drafted, np.int64)
        h = self._segments(self._lower, state["past"], emb, state["length"] + drafted, pos)
        state["drafted"] = drafted + 1
        return h

    def _draft_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The drafting head's logits: through the reduced-vocabulary draft head when the
        artifact has one (-inf outside its tokens), else through the full LM head."""
        draft = self.split.draft_head
        if draft is None:
            return self._verbalizer(self._draft_layer, hidden)
        head = self._heads[self._draft_layer]
        normed = self._run_graph(head.graph, {head.input: hidden})[head.output]
        sub = self._run_graph(draft.graph, {draft.input: normed})[draft.output][0, -1]
        full = np.full(self.model["vocab_size"], -np.inf, np.float32)
        full[self._draft_ids] = sub
        return full

    def _verify(self, state, drafted: list) -> np.ndarray:
        n = len(drafted)
        h = np.concatenate(drafted, axis=1)
        first = state["next_pos"]
        pos = np.broadcast_to(np.arange(first, first + n, dtype=np.int64), (self.spec.position_axes, 1, n)).copy()
        if self._upper:
            h = self._segments(self._upper, state["past"], h, state["length"], pos, row_wise=True)
        state["length"] += n
        state["next_pos"] += n
        state["drafted"] = 0
        return self._head_rows(h)

    def _rollback(self, state, n: int) -> None:
        state["drafted"] = 0
        drop = state["length"] - n
        if drop:
            self._truncate(state, n)
            state["length"] = n
            state["next_pos"] -= drop

    def _embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self._run_graph("embed", {"input_ids": ids})["inputs_embeds"], np.float32)

    def _new_state(self):
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {"past": [(empty, empty)] * self.n_layers, "length": 0}

    def _truncate(self, state, n):
        state["past"] = [(k[:, :, :n], v[:, :, :n]) for k, v in state["past"]]
