"""The TensorRT backend, and the same generation loop over the same files on ONNX Runtime.

A TensorRT artifact (``vlsi export --target tensorrt``) holds graphs, not engines: engines are
built on the device (``vlsi build``) into ``engines/trt<version>_sm<cc>/``. Everything but the
kernels is host code written once here, in :class:`TensorRTRuntime`: prompt and image
splicing, the fp16 embedding rows read from the memory-mapped table, M-RoPE or 1-D rotary
cos/sin (:mod:`vlsi.archs.rope`), KV bookkeeping, context limits and the verbalizer outputs.
The graphs themselves run through a :class:`GraphRunner`:

- :class:`OrtRunner` — ONNX Runtime (CPU by default) over the exact ``.onnx`` files TensorRT
  builds: the export's parity gate and the tests run the whole loop on a machine without a
  GPU (``vlsi_runtimes.load(art, backend="onnx")``);
- :class:`~vlsi_runtimes.tensorrt_engine.EngineRunner` — TensorRT's Python API over the built
  engines, device buffers through ``cuda-python`` or polygraphy's ctypes wrapper (no torch).

Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsi.archs import get_spec
from vlsi.archs.rope import rope_tables
from vlsi.errors import ConfigError
from vlsi.manifest import ArtifactError, load_manifest

from .base import FINAL, SpecRuntime


class GraphRunner:
    """What the loop needs from an execution engine. ``cache`` objects are the runner's own
    (host arrays for ONNX Runtime, device buffers for TensorRT); the loop only passes them back."""

    name = "base"
    max_context: int | None = None
    """Tokens the decoder takes in all (prompt + generated); ``None``: unbounded."""
    max_image_tokens: int | None = None

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The vision graph on its inputs by name -> ``image_embeds``."""
        raise NotImplementedError

    def new_cache(self):
        """An empty KV cache for one sequence."""
        raise NotImplementedError

    def decoder(self, cache, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder call on ``inputs_embeds``, ``attention_mask``, ``rope_cos``, ``rope_sin``
        (the past comes from ``cache``, which is advanced); the logit outputs by name."""
        raise NotImplementedError

    def truncate(self, cache, n: int) -> None:
        """Keep the first ``n`` positions of ``cache`` (prefix reuse). Runners without it raise
        NotImplementedError and every prompt is prefilled whole."""
        raise NotImplementedError


class OrtRunner(GraphRunner):
    """ONNX Runtime over the TensorRT-flavoured ``vision.onnx`` and ``decoder.onnx``."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest, providers=None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.graphs = {name: manifest.graph(name) for name in ("vision", "decoder")}
        self.sessions = {name: ort.InferenceSession(str(folder / g.file), opts, providers=self.providers)
                         for name, g in self.graphs.items()}
        m = manifest.model
        self.n_layers, self.kv_heads, self.head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        dtype = {i.name: i.type for i in self.sessions["decoder"].get_inputs()}["past_key_0"]
        self.kv_dtype = np.float16 if "float16" in dtype else np.float32
        self.logit_names = [n for n in self.graphs["decoder"].outputs if not n.startswith("present_")]

    def vision(self, feeds):
        g = self.graphs["vision"]
        return self.sessions["vision"].run(["image_embeds"], {n: feeds[n] for n in g.inputs})[0]

    def new_cache(self):
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return {"past": [(empty, empty)] * self.n_layers}

    def truncate(self, cache, n):
        cache["past"] = [(k[:, :, :n], v[:, :, :n]) for k, v in cache["past"]]

    def decoder(self, cache, feeds):
        feed = dict(feeds)
        for i, (k, v) in enumerate(cache["past"]):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = k, v
        names = self.graphs["decoder"].outputs
        outs = dict(zip(names, self.sessions["decoder"].run(names, feed)))
        cache["past"] = [(outs[f"present_key_{i}"], outs[f"present_value_{i}"]) for i in range(self.n_layers)]
        return {n: outs[n] for n in self.logit_names}


def install_hint() -> str:
    return ("install TensorRT's Python package: on a Jetson, JetPack's `sudo apt install python3-libnvinfer` and a "
            "venv made with --system-site-packages; on a desktop GPU, `pip install tensorrt-cu12` (or -cu13) and "
            "`pip install 'vlsi[tensorrt]'`. To check the same graphs on ONNX Runtime instead (CPU, not TensorRT), "
            "use --backend onnx")


class TensorRTRuntime(SpecRuntime):
    """Load with :func:`vlsi_runtimes.load` (``backend="tensorrt"``: engines; ``"onnx"``: the same
    graphs on ONNX Runtime)."""

    name = "tensorrt"

    def __init__(self, folder, engine: str = "tensorrt", providers: list[str] | None = None, threads: int = 0,
                 parity: bool = False, engines: str | Path | None = None, manifest=None):
        """``engine``: ``"tensorrt"`` (built engines, picked for this TensorRT version and GPU,
        or the folder ``engines``) or ``"onnxruntime"``. ``parity`` changes nothing: the cache is
        the graphs' own fp16 at every precision. ``manifest``: use this one instead of the
        folder's (the export runs the loop before its manifest is written)."""
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = m = manifest if manifest is not None else load_manifest(self.folder)
        if m.target != "tensorrt":
            raise ArtifactError(f"{self.folder} is a {m.target!r} artifact, not a TensorRT one")
        self.model = m.model
        self.spec = get_spec(m.arch)
        self.image_spec = self.spec.image_spec(self.folder)
        self.image_token_id = m.model["image_token_id"]
        self.verbalizer_layers = tuple(m.verbalizers)
        self.eos_ids = tuple(m.eos_token_ids)
        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.rope = m.graph("decoder").details["rope"]
        self.table = np.load(self.folder / m.graph("embed").file, mmap_mode="r")  # rows read on demand
        if engine == "onnxruntime":
            self.runner = OrtRunner(self.folder, m, providers, threads)
            self.name = "onnx"
        elif engine == "tensorrt":
            from .tensorrt_engine import EngineRunner

            self.runner = EngineRunner(self.folder, m, engines)
        else:
            raise ConfigError(f"engine {engine!r} is not one of tensorrt, onnxruntime")
        self.graph_dtype = np.float16
        self.context_length = self.runner.max_context

    def _vision(self, vision) -> np.ndarray:
        tokens = sum(vision.tokens)
        cap = self.runner.max_image_tokens
        if cap is not None and tokens > cap:
            raise ConfigError(f"the images take {tokens} image tokens; these engines were built for at most {cap} "
                              "(rebuild with `vlsi build --max-image-tokens N`, or send smaller images)")
        return self.runner.vision(vision.feeds)

    def _decode(self, state, embeds: np.ndarray, positions: np.ndarray) -> dict:
        total = state["length"] + embeds.shape[1]
        cap = self.runner.max_context
        if cap is not None and total > cap:
            raise ConfigError(f"the conversation needs {total} tokens; these engines were built for a context of "
                              f"{cap} (rebuild with `vlsi build --max-context N`, or ask for fewer new tokens)")
        cos, sin = rope_tables(positions, self.rope)
        feeds = {"inputs_embeds": embeds.astype(self.graph_dtype, copy=False),
                 "attention_mask": np.ones((1, total), np.int64), "rope_cos": cos, "rope_sin": sin}
        outs = self.runner.decoder(state["cache"], feeds)
        state["length"] = total
        res = {FINAL: np.asarray(outs["logits"][0], np.float32)}
        for layer in self.verbalizer_layers:
            res[layer] = np.asarray(outs[f"verbalizer_logits_{layer}"][0], np.float32)
        return res

    def _forward(self, state, embeds, positions):
        return self._decode(state, embeds, positions)

    def _embed_tokens(self, ids):
        return np.array(self.table[ids[0]])[None]  # (1, L, D): only these rows are read from disk

    def _new_state(self):
        return {"cache": self.runner.new_cache(), "length": 0}

    def _truncate(self, state, n):
        truncate = getattr(self.runner, "truncate", None)
        if truncate is None:  # TensorRT engines: the device KV buffers are laid out per length; prefill whole
            raise NotImplementedError
        truncate(state["cache"], n)
