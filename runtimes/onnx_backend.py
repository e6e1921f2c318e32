"""ONNX Runtime backend, for every architecture the ONNX target exports. Imports neither torch
nor transformers: an edge install is ``tokenizers`` + numpy + Pillow + onnxruntime.

Everything architecture-specific (image marker, preprocessing, the vision graph's inputs,
position ids) comes from the architecture's torch-free spec, named by the manifest; graph
inputs and outputs are fed and read by the names the manifest lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsi.archs import get_spec
from vlsi.manifest import ArtifactError, load_manifest

from .base import FINAL, SpecRuntime


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
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or default_providers()
        self.graphs = {name: m.graph(name) for name in ("vision", "embed", "decoder")}
        self.sessions = {name: ort.InferenceSession(str(self.folder / g.file), opts, providers=self.providers)
                         for name, g in self.graphs.items()}
        outs = set(self.graphs["decoder"].outputs)
        want = {"logits", *(f"verbalizer_logits_{k}" for k in self.verbalizer_layers),
                *(f"present_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value"))}
        if want - outs:
            raise ArtifactError(f"{self.folder}: decoder.onnx lacks outputs {sorted(want - outs)[:4]}; re-export it")

    # ------------------------------------------------------------------ pieces
    def _run_graph(self, name: str, feeds: dict) -> dict[str, np.ndarray]:
        """Run graph ``name`` on the inputs it lists; its outputs by name."""
        g = self.graphs[name]
        missing = [n for n in g.inputs if n not in feeds]
        if missing:
            raise ArtifactError(f"{name}.onnx takes inputs {missing} that {self.spec.name}'s spec did not make; "
                                "the artifact and this vlsi disagree: re-export it")
        return dict(zip(g.outputs, self.sessions[name].run(g.outputs, {n: feeds[n] for n in g.inputs})))

    def _vision(self, vision) -> np.ndarray:
        return self._run_graph("vision", vision.feeds)["image_embeds"]

    def _forward(self, state, embeds, positions):
        feed = {"inputs_embeds": embeds.astype(np.float32, copy=False),
                "attention_mask": np.ones((1, state["length"] + embeds.shape[1]), np.int64),
                "position_ids": positions}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = state["past"][i]
        outs = self._run_graph("decoder", feed)
        state["past"] = [(outs[f"present_key_{i}"], outs[f"present_value_{i}"]) for i in range(self.n_layers)]
        state["length"] += embeds.shape[1]
        res = {FINAL: outs["logits"][0]}
        for layer in self.verbalizer_layers:
            res[layer] = outs[f"verbalizer_logits_{layer}"][0]
        return res

    def _embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return np.array(self._run_graph("embed", {"input_ids": ids})["inputs_embeds"], np.float32)

    def _new_state(self):
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {"past": [(empty, empty)] * self.n_layers, "length": 0}

    def _truncate(self, state, n):
        state["past"] = [(k[:, :, :n], v[:, :, :n]) for k, v in state["past"]]
