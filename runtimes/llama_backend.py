"""llama.cpp backend (through llama-cpp-python's low-level bindings). Imports neither torch
nor transformers: an edge install is ``llama-cpp-python`` + ``gguf`` + ``tokenizers`` + numpy
+ Pillow.

Images go through llama.cpp's multimodal library (``mtmd``): the prompt is rendered as text
with one media marker per image, ``mtmd_tokenize`` splits it into text and image chunks, and
``mtmd_helper_eval_chunk_single`` encodes each image and decodes each chunk with M-RoPE
positions. Images are resized here first, with the same code as the other backends, to the
size the model's processor would choose, so llama.cpp's own resize is a copy.

Verbalizers: llama.cpp's eval callback (``cb_eval``) hands over the residual stream after
the target layers (graph tensors ``l_out-{i}``); the heads from ``verbalizers.gguf`` and the
model's own output matrix are applied in numpy, only when a verbalizer's logits are actually
read (:class:`OutputMatrix`: nothing is read or allocated for it before then, and plain
decoding never reads it).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from vlsi.archs import get_spec
from vlsi.chat import chat_text
from vlsi.images import load_image
from vlsi.manifest import ArtifactError, load_manifest

from vlsi.llama_cpp import cpu_has_amx, quiet_logs

from .base import LayerLogits, Prompt, Runtime, image_digest

def _ggml():
    """The few ggml functions the eval callback needs, typed."""
    from llama_cpp._ggml import libggml

    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    libggml.ggml_nbytes.restype = ctypes.c_size_t
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    return libggml


def _rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu(x):
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


class OutputMatrix:
    """The model's output matrix ``(V, D)`` (tied: the token embedding) from the GGUF text file,
    for the verbalizer heads, read on the first product and never before.

    An f32 or f16 tensor is used where it lies in the memory-mapped file (pages shared with
    llama.cpp's own mapping, nothing copied); a quantised one is dequantised once, a block of
    rows at a time, into an f16 copy (half of f32's 545 MB at the Qwen2-0.5B shape, and no
    full-size f32 array on the way). Products convert a block of rows at a time to f32 in one
    reused buffer, so BLAS does the arithmetic."""

    def __init__(self, path: Path, n_vocab: int, n_embd: int, rows_per_block: int = 4096):
        self.path, self.shape, self.block = Path(path), (n_vocab, n_embd), rows_per_block
        self.rows: np.ndarray | None = None
        """``(V, D)`` f32 or f16 once loaded; ``None`` until a verbalizer's logits are first read."""
        self._buf: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self.rows is None:
            import gguf
            from gguf.quants import dequantize

            r = gguf.GGUFReader(str(self.path))  # memory-mapped
            by = {t.name: t for t in r.tensors}
            t = by.get("output.weight") or by["token_embd.weight"]
            kind = gguf.GGMLQuantizationType
            if t.tensor_type in (kind.F32, kind.F16):
                self.rows = np.asarray(t.data).reshape(self.shape)
            else:
                data = t.data.reshape(self.shape[0], -1)  # one row of quantised blocks per vocabulary entry
                rows = np.empty(self.shape, np.float16)
                for lo in range(0, self.shape[0], self.block):
                    rows[lo:lo + self.block] = dequantize(data[lo:lo + self.block], t.tensor_type)
                self.rows = rows
        return self.rows

    def take(self, ids: list[int]) -> np.ndarray:
        """Rows ``ids`` as ``(len(ids), D)`` f32 (a draft head's reduced vocabulary): from the
        loaded rows when they are, else only these rows, dequantised from the file."""
        if self.rows is not None:
            return np.asarray(self.rows[ids], np.float32)
        import gguf
        from gguf.quants import dequantize

        r = gguf.GGUFReader(str(self.path))
        by = {t.name: t for t in r.tensors}
        t = by.get("output.weight") or by["token_embd.weight"]
        kind = gguf.GGMLQuantizationType
        if t.tensor_type in (kind.F32, kind.F16):
            return np.asarray(np.asarray(t.data).reshape(self.shape)[ids], np.float32)
        return np.asarray(dequantize(t.data.reshape(self.shape[0], -1)[ids], t.tensor_type), np.float32)

    def __matmul__(self, h: np.ndarray) -> np.ndarray:
        """``W @ h`` for an f32 vector ``h (D,)`` -> ``(V,)`` f32."""
        rows = self.load()
        if rows.dtype == np.float32:
            return rows @ h
        if self._buf is None:
            self._buf = np.empty((self.block, self.shape[1]), np.float32)
        out = np.empty(self.shape[0], np.float32)
        for lo in range(0, self.shape[0], self.block):
            part = rows[lo:lo + self.block]
            buf = self._buf[:len(part)]
            np.copyto(buf, part)
            np.matmul(buf, h, out=out[lo:lo + len(part)])
        return out


class NumpyVerbalizers:
    """The heads of ``verbalizers.gguf`` (verb_ffn / ffn / mlp, at either size) applied to a hidden vector."""

    def __init__(self, path: Path, output_matrix: OutputMatrix):
        import gguf

        r = gguf.GGUFReader(str(path))
        self.cfg = json.loads(str(r.fields["vlsi.verbalizers.config"].contents()))
        self.eps = {int(k): v for k, v in json.loads(str(r.fields["vlsi.verbalizers.eps"].contents())).items()}
        self.w = {t.name: np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
                  for t in r.tensors}
        self.layers = tuple(int(k) for k in self.cfg["target_layers"])
        self.output = output_matrix  # loaded on its first product

    def hidden(self, layer: int, h: np.ndarray) -> np.ndarray:
        p = f"heads.{layer}."
        for b in range(int(self.cfg["depth"])):
            q = f"{p}blocks.{b}."
            if self.cfg["arch"] == "mlp" and q + "fc.weight" in self.w:  # the paper's size: x + gelu(W x)
                h = h + _gelu(h @ self.w[q + "fc.weight"].T)
            elif self.cfg["arch"] == "mlp":  # sizes="legacy": two projections
                x = h @ self.w[q + "fc1.weight"].T + self.w[q + "fc1.bias"]
                h = h + _gelu(x) @ self.w[q + "fc2.weight"].T + self.w[q + "fc2.bias"]
            else:
                g = _silu(h @ self.w[q + "gate.weight"].T) * (h @ self.w[q + "up.weight"].T)
                h = h + g @ self.w[q + "down.weight"].T
        return _rms_norm(h, self.w[p + "norm.weight"], self.eps[layer])

    def logits(self, layer: int, h: np.ndarray) -> np.ndarray:
        return self.output @ self.hidden(layer, h.astype(np.float32))


class _Chunks:
    """mtmd's tokenised prompt (text and image chunks); freed with the prompt."""

    def __init__(self, mtmd, chunks, bitmaps):
        self.mtmd, self.chunks, self.bitmaps = mtmd, chunks, bitmaps
        self.starts: list[int] = []  # the first token of each chunk
        self.positions: list[int] = []  # llama.cpp's position of each token (an image's: its first)

    def __del__(self):
        try:
            self.mtmd.mtmd_input_chunks_free(self.chunks)
            for b in self.bitmaps:
                self.mtmd.mtmd_bitmap_free(b)
        except Exception:  # interpreter shutdown
            pass


class _DraftModel:
    """``draft.gguf`` (the text model's first L blocks) in a context of its own. Drafting one
    token decodes it here; with the verbalizer drafter the eval callback takes the residual
    stream after block L and stops the graph there (the draft file's final norm and output
    matrix are not run); with the model's own drafter (llama.cpp's usual draft model: the
    truncated model's norm and head) the logits are read."""

    def __init__(self, rt: LlamaCppRuntime, path: Path, n_ctx: int, n_batch: int):
        ll = rt._ll
        self.ll, self.g = ll, _ggml()
        self.model = ll.llama_model_load_from_file(str(path).encode(), rt._mp)
        if not self.model:
            raise ArtifactError(f"llama.cpp could not load the draft model {path}; re-export with --draft-layer")
        if ll.llama_model_n_embd(self.model) != rt.n_embd or \
                ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model)) != rt.n_vocab:
            ll.llama_model_free(self.model)
            raise ArtifactError(f"{path} is not a draft of {rt.folder}'s text model (other width or vocabulary); "
                                "re-export with --draft-layer")
        self.n_embd = rt.n_embd
        self.stop = False  # take the last block's output and stop the graph there
        self.hidden: np.ndarray | None = None
        self._want = f"l_out-{rt.draft_layer - 1}".encode()
        self._callback = ll.ggml_backend_sched_eval_callback(self._on_tensor)
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = rt.threads
        cp.type_k = cp.type_v = rt._kv_type
        cp.cb_eval = self._callback
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise ArtifactError(f"llama.cpp could not create a context for the draft model {path}")
        self.batch = ll.llama_batch_init(1, 0, 1)
        # numpy's BLAS threads spin after a product and take the cores llama.cpp's next decode
        # needs (0.5B shape, q8_0, 2 threads: drafting at 4.6 tok/s, 10 with one BLAS thread)
        from threadpoolctl import ThreadpoolController

        self.blas = ThreadpoolController()
        self.keys: list | None = []
        """One key per position this context holds (``None``: unknown, cleared before use)."""

    def _on_tensor(self, t, ask, user):
        if not self.stop:
            return not ask
        name = self.g.ggml_get_name(t)
        if ask:
            return name == self._want
        if name == self._want:
            n = self.g.ggml_nbytes(t)
            buf = np.empty(n // 4, dtype=np.float32)
            self.g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, n)
            self.hidden = buf[-self.n_embd:].copy()
            return False  # the rest of the graph (final norm, output matrix) is not needed
        return True

    def feed(self, token: int, pos: int, stop: bool) -> None:
        b = self.batch
        b.n_tokens = 1
        b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = token, pos, 1, True
        b.seq_id[0][0] = 0
        self.stop, self.hidden = stop, None
        try:
            rc = self.ll.llama_decode(self.ctx, b)
        finally:
            self.stop = False
        if rc != 0:
            raise ArtifactError(f"llama_decode of the draft model failed (code {rc})")
        if stop and self.hidden is None:
            raise RuntimeError("the draft model's graph has no l_out tensor for its last block")

    def logits(self, n_vocab: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def cut(self, pos: int) -> None:
        self.ll.llama_memory_seq_rm(self.ll.llama_get_memory(self.ctx), 0, pos, -1)

    def close(self):
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None


class LlamaCppRuntime(Runtime):
    name = "gguf"

    def __init__(self, folder, threads: int = 0, n_ctx: int = 4096, kv_type: str | None = None, gpu_layers: int = -1,
                 verbose: bool = False, parity: bool = False):
        """``kv_type``: "f16" (llama.cpp's default) or "f32" (no rounding of keys and values, about
        10% slower decoding at a few hundred tokens of context); ``parity=True`` means f32 unless
        ``kv_type`` says otherwise."""
        import llama_cpp
        from llama_cpp import mtmd_cpp
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = man = load_manifest(self.folder)
        if man.target != "gguf":
            raise ArtifactError(f"{self.folder} is a {man.target!r} artifact, not a GGUF one")
        kv_type = kv_type or ("f32" if parity else "f16")
        self.image_token_id = man.model["image_token_id"]
        self.eos_ids = tuple(man.eos_token_ids)
        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.spec = get_spec(man.arch)
        self.image_spec = self.spec.image_spec(self.folder)
        text = self.folder / man.graph("text").file
        mmproj = self.folder / man.graph("mmproj").file
        limits = man.graph("mmproj").details
        for f, what in ((text, "text model"), (mmproj, "vision projector (mmproj)")):
            if not f.is_file():
                raise ArtifactError(f"{f}: the {what} is missing; re-export the artifact")
        self._ll, self._mtmd = llama_cpp, mtmd_cpp
        if not verbose:
            quiet_logs()
        llama_cpp.llama_backend_init()
        threads = threads or max(1, os.cpu_count() or 1)
        self.threads = threads

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers  # no effect in a CPU build; all layers on a GPU build (Jetson)
        if cpu_has_amx():
            mp.use_extra_bufts = False  # plain CPU buffers decode correctly there
        self.model = llama_cpp.llama_model_load_from_file(str(text).encode(), mp)
        if not self.model:
            raise ArtifactError(f"llama.cpp could not load {text} (truncated or not a GGUF text model); "
                                "re-export it, or run with VLSI_LLAMA_LOG=1 for llama.cpp's reason")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

        # verbalizers: capture the residual stream after the target layers
        self.verbalizer_layers = tuple(man.verbalizers)
        self._hidden: dict[int, np.ndarray] = {}
        self._callback = None
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        if kv_type not in ("f32", "f16"):
            raise ArtifactError(f"kv_type {kv_type!r} must be f32 or f16")
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32 if kv_type == "f32" else llama_cpp.GGML_TYPE_F16
        if self.verbalizer_layers:
            self.output_matrix = OutputMatrix(text, self.n_vocab, self.n_embd)
            self._verb = NumpyVerbalizers(self.folder / man.graph("verbalizers").file, self.output_matrix)
            self._want = {f"l_out-{k - 1}".encode(): k for k in self.verbalizer_layers}
            self._g = _ggml()
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
            cp.cb_eval = self._callback
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise ArtifactError(f"llama.cpp could not create a context for {text} (n_ctx={n_ctx})")
        self.n_ctx = self.context_length = n_ctx
        self.n_batch = cp.n_batch

        mcp = mtmd_cpp.mtmd_context_params_default()
        mcp.use_gpu = gpu_layers != 0
        mcp.print_timings = False
        mcp.n_threads = threads
        mcp.warmup = False
        # images arrive resized by the model's own processor rules (``_encode``), whose output can
        # lie outside its pixel bounds (a small image grown past max_pixels, a panorama's short
        # side clamped to one merge unit): bounds that take any such size keep mtmd from resizing
        # them again. The manifest's bounds are for llama.cpp's own tools, which do not pre-resize.
        mcp.image_min_tokens = 1
        mcp.image_max_tokens = max(int(limits.get("image_max_tokens", 1)), 1 << 16)
        self.mctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.model, mcp)
        if not self.mctx:
            raise ArtifactError(f"llama.cpp could not load the vision projector {mmproj} with {text}: truncated, or "
                                "not the projector made for this text model (its output width must equal the text "
                                "model's hidden size); re-export the pair")
        if not mtmd_cpp.mtmd_support_vision(self.mctx):
            raise ArtifactError(f"{mmproj} has no vision encoder")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self._batch = llama_cpp.llama_batch_init(1, 0, 1)
        self._text_batch = None  # n_batch tokens, made when a reused prefix ends inside text
        self._kv_type, self._gpu_layers, self._mp = cp.type_k, gpu_layers, mp
        # the draft model (``draft.gguf``): loaded on the first speculative request, never before
        self.draft_layer = int(man.graph("draft").details.get("layer", 0)) if "draft" in man.graphs else 0
        self._draft = None

    def close(self):
        ll, mt = self._ll, self._mtmd
        if getattr(self, "mctx", None):
            mt.mtmd_free(self.mctx)
            self.mctx = None
        self._entry = None  # the cached sequence lives in this context
        if getattr(self, "_draft", None) is not None:
            self._draft.close()
            self._draft = None
        for name in ("_batch", "_text_batch"):
            if getattr(self, name, None) is not None:
                ll.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ verbalizers
    def _on_tensor(self, t, ask, user):
        if not self.capture_layers:  # plain decoding: llama.cpp asks about every node, answer at once
            return not ask
        name = self._g.ggml_get_name(t)
        if ask:
            return name in self._want
        layer = self._want.get(name)
        if layer is not None and ctypes.c_int32.from_address(t).value == 0:  # GGML_TYPE_F32
            n = self._g.ggml_nbytes(t)
            buf = np.empty(n // 4, dtype=np.float32)
            self._g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, n)
            self._hidden[layer] = buf.reshape(-1, self.n_embd)[-1].copy()
        return True

    # ------------------------------------------------------------------ pieces
    def chat_text(self, turns, images: int | None = None) -> str:
        """The prompt as text with one media marker per image (the layout of :func:`vlsi.chat.chat_text`);
        ``chat_text(n_images, question)`` for one user turn."""
        if isinstance(turns, int):
            turns = self.user_turns([None] * turns, images or "")
        return chat_text(turns, self.marker, for_generation=True)[0]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's own tokenisation of ``text`` (special tokens parsed when ``special``)."""
        raw = text.encode()
        n = len(raw) + 8
        out = (self._ll.llama_token * n)()
        k = self._ll.llama_tokenize(self.vocab, raw, len(raw), out, n, False, special)
        if k < 0:
            out = (self._ll.llama_token * -k)()
            k = self._ll.llama_tokenize(self.vocab, raw, len(raw), out, -k, False, special)
        return list(out[:k])

    def _encode(self, turns, images):
        mt = self._mtmd
        checked = [load_image(im, self.image_spec) for im in images]
        pil = [self.image_spec.resize(im) for im in checked]
        bitmaps = []
        for im in pil:
            rgb = np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
            data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmaps.append(mt.mtmd_bitmap_init(im.width, im.height, data))
        raw = self.chat_text(turns).encode()
        txt = mt.mtmd_input_text(text=raw, text_len=len(raw), add_special=False, parse_special=True)
        chunks = mt.mtmd_input_chunks_init()
        held = _Chunks(mt, chunks, bitmaps)
        arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        rc = mt.mtmd_tokenize(self.mctx, chunks, ctypes.byref(txt), arr, len(bitmaps))
        if rc != 0:
            raise ArtifactError(f"llama.cpp could not tokenise the prompt with {len(bitmaps)} images (mtmd_tokenize "
                                f"returned {rc}: 1 = marker/image count mismatch, 2 = image preprocessing failed)")
        ids, spans, pos, n_pos = [], [], [], 0
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            c = mt.mtmd_input_chunks_get(chunks, i)
            held.starts.append(len(ids))
            if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                toks = mt.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                ids += [int(toks[j]) for j in range(n.value)]
                pos += range(n_pos, n_pos + n.value)
                n_pos += n.value
            else:
                k = int(mt.mtmd_input_chunk_get_n_tokens(c))
                spans.append((len(ids), k))
                ids += [self.image_token_id] * k
                pos += [n_pos] * k  # the KV cells of an image sit at its first position (M-RoPE)
                n_pos += int(mt.mtmd_input_chunk_get_n_pos(c))
        held.positions = pos
        if len(ids) + 1 >= self.n_ctx:
            raise ArtifactError(f"the prompt is {len(ids)} tokens; this context holds {self.n_ctx}")
        return Prompt(ids, held, spans, [image_digest(im) for im in checked], checked)

    def image_embeds(self, images) -> np.ndarray:
        """llama.cpp encodes one image at a time, through its own preprocessing."""
        return np.concatenate([self.image_embeds_for(im) for im in images])

    def image_embeds_for(self, image) -> np.ndarray:
        """The projector's output for one image, ``(n_tokens, hidden)``."""
        mt = self._mtmd
        p = self._encode(self.user_turns([image], ""), [image])
        chunks = p.images.chunks
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            c = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                if mt.mtmd_encode_chunk(self.mctx, c) != 0:
                    raise ArtifactError("llama.cpp failed to encode the image")
                n = int(mt.mtmd_input_chunk_get_n_tokens(c))
                ptr = mt.mtmd_get_output_embd(self.mctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        raise ArtifactError("no image chunk in the prompt")

    def _logits(self) -> LayerLogits:
        ptr = self._ll.llama_get_logits_ith(self.ctx, -1)
        final = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        hidden = dict(self._hidden)

        def layer(k):
            if k not in hidden:
                raise RuntimeError(f"layer {k}'s state was not kept for this step (capture_layers was off)")
            return self._verb.logits(k, hidden[k])

        return LayerLogits(final, self.verbalizer_layers, layer)

    def _prefill(self, prompt: Prompt):
        ll = self._ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        state = {"n_past": 0, "prompt": prompt}
        return state, self._eval_from(state, prompt, 0)

    def _resume(self, state, n, prompt):
        """Drop the cached positions from token ``n`` on (``llama_memory_seq_rm``) and evaluate the rest."""
        ll = self._ll
        at = prompt.images.positions[n]
        if not ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, at, -1):
            raise NotImplementedError  # this memory cannot cut a sequence: prefill whole
        state = {"n_past": at, "prompt": prompt}
        return state, self._eval_from(state, prompt, n)

    def _eval_from(self, state, prompt: Prompt, start: int, ctx=None) -> LayerLogits | None:
        """Evaluate ``prompt`` from token ``start`` (a chunk boundary or inside a text chunk) into
        the model's context, or into ``ctx`` (the draft's: no logits)."""
        ll, mt = self._ll, self._mtmd
        self._hidden.clear()
        main = ctx is None
        ctx = self.ctx if main else ctx
        held = prompt.images
        chunks = held.chunks
        count = mt.mtmd_input_chunks_size(chunks)
        for i in range(count):
            first = held.starts[i]
            end = held.starts[i + 1] if i + 1 < count else len(prompt.ids)
            if end <= start:
                continue
            last = main and i == count - 1
            if first < start:  # the reused prefix ends inside this text chunk: feed its rest
                self._decode_tokens(prompt.ids[start:end], state["n_past"], last, ctx)
                state["n_past"] += end - start
                continue
            new = ll.llama_pos(state["n_past"])  # in/out: the helper adds the positions it used
            rc = mt.mtmd_helper_eval_chunk_single(self.mctx, ctx, mt.mtmd_input_chunks_get(chunks, i),
                                                  state["n_past"], 0, self.n_batch, last, ctypes.byref(new))
            if rc != 0:
                raise ArtifactError(f"llama.cpp failed to evaluate prompt chunk {i} (code {rc})")
            state["n_past"] = new.value
        return self._logits() if main else None

    def _decode_tokens(self, tokens: list[int], pos: int, logits_last: bool, ctx=None,
                       every_logit: bool = False) -> None:
        """Text tokens at positions ``pos, pos + 1, ...`` in batches of ``n_batch`` into the
        model's context (or ``ctx``); logits for the last token, or for each (``every_logit``)."""
        ll = self._ll
        ctx = self.ctx if ctx is None else ctx
        if self._text_batch is None:
            self._text_batch = ll.llama_batch_init(self.n_batch, 0, 1)
        b = self._text_batch
        for lo in range(0, len(tokens), self.n_batch):
            part = tokens[lo:lo + self.n_batch]
            b.n_tokens = len(part)
            for j, tok in enumerate(part):
                b.token[j] = tok
                b.pos[j] = pos + lo + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = every_logit or (logits_last and lo + j == len(tokens) - 1)
            rc = ll.llama_decode(ctx, b)
            if rc != 0:
                raise ArtifactError(f"llama_decode failed (code {rc})")

    def _step(self, state, token):
        if state["n_past"] + 1 >= self.n_ctx:
            raise ArtifactError(f"the context of {self.n_ctx} tokens is full")
        b = self._batch
        b.n_tokens = 1
        b.token[0] = token
        b.pos[0] = state["n_past"]
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = True
        self._hidden.clear()
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise ArtifactError(f"llama_decode failed (code {rc})")
        state["n_past"] += 1
        return self._logits()

    # ------------------------------------------------------------------ self-speculative decoding
    MAX_DRAFT = 15

    def _speculation_check(self, spec) -> None:
        from vlsi.errors import ConfigError

        if not self.draft_layer:
            raise ConfigError(f"{self.folder} has no draft model: export with --target gguf --draft-layer L "
                              "(and --verbalizers to draft with the layer-L verbalizer)")
        if spec.layer != self.draft_layer:
            raise ConfigError(f"speculative layer {spec.layer}: {self.folder}'s draft model is its first "
                              f"{self.draft_layer} layers; draft at layer {self.draft_layer} or re-export with "
                              f"--draft-layer {spec.layer}")
        if spec.drafter == "verbalizer" and spec.layer not in self.verbalizer_layers:
            raise ConfigError(f"speculative layer {spec.layer} has no verbalizer head in {self.folder} (kept: "
                              f"{list(self.verbalizer_layers)}); export with --verbalizers, or draft with the "
                              "draft model's own head: drafter='model'")
        if spec.tokens > self.MAX_DRAFT:
            raise ConfigError(f"speculative tokens={spec.tokens}: the llama.cpp backend drafts at most "
                              f"{self.MAX_DRAFT} tokens per cycle")
        if self._draft is None:
            self._draft = self._open_draft()
        self._drafter = spec.drafter

    def _open_draft(self) -> _DraftModel:
        from vlsi.llama_cpp import read_draft_gguf

        g = self.manifest.graph("draft")
        path = self.folder / g.file
        if not path.is_file():
            raise ArtifactError(f"{path}: the draft model is missing; re-export with --draft-layer")
        fields = read_draft_gguf(path)
        text = self.manifest.graph("text").file
        want = self.manifest.files.get(text, {}).get("sha256")
        if fields.get("model_sha256") != want or fields.get("layer") != self.draft_layer:
            raise ArtifactError(f"{path} was not cut from {self.folder / text} (its vlsi.draft fields name another "
                                "model file or layer); re-export with --draft-layer")
        d = _DraftModel(self, path, self.n_ctx, self.n_batch)
        ids = fields.get("vocab")
        d.vocab = np.asarray(ids, np.int64) if ids else None
        d.rows = None  # the draft head's rows of the output matrix, read on the first draft
        return d

    def _sync_draft(self, state) -> None:
        """Make the draft context hold what the model's does (the prompt; a speculative answer
        starts right after it), reusing the prefix it already holds."""
        from .base import shared_prefix

        d, prompt = self._draft, state["prompt"]
        keys, d.keys = d.keys, None
        n = shared_prefix(keys, prompt) if keys else 0
        at = prompt.images.positions[n] if n else 0
        if not keys or not self._ll.llama_memory_seq_rm(self._ll.llama_get_memory(d.ctx), 0, at, -1):
            self._ll.llama_memory_clear(self._ll.llama_get_memory(d.ctx), True)
            n, at = 0, 0
        mirror = {"n_past": at}
        self._eval_from(mirror, prompt, n, d.ctx)
        if mirror["n_past"] != state["n_past"]:
            raise RuntimeError(f"the draft context holds {mirror['n_past']} positions, the model's {state['n_past']}")
        d.keys = prompt.keys()
        state["draft"] = True

    def _fed(self, state) -> int:
        return state["n_past"]

    def _draft_feed(self, state, token: int):
        if not state.get("draft"):
            self._sync_draft(state)
        drafted = state.get("drafted", 0)
        self._draft.feed(token, state["n_past"] + drafted, stop=self._drafter == "verbalizer")
        state["drafted"] = drafted + 1
        return token, (self._draft.hidden if self._drafter == "verbalizer" else self._draft.logits(self.n_vocab))

    def _draft_logits(self, drafted) -> np.ndarray:
        _, got = drafted
        if self._drafter != "verbalizer":
            return got
        d = self._draft
        with d.blas.limit(limits=1, user_api="blas"):
            normed = self._verb.hidden(self.draft_layer, got.astype(np.float32))
            if d.vocab is None:
                return self.output_matrix @ normed
            if d.rows is None:
                d.rows = self.output_matrix.take(d.vocab)
            full = np.full(self.n_vocab, -np.inf, np.float32)
            full[d.vocab] = d.rows @ normed
        return full

    def _verify(self, state, drafted: list) -> np.ndarray:
        tokens = [t for t, _ in drafted]
        n = len(tokens)
        if state["n_past"] + n >= self.n_ctx:
            raise ArtifactError(f"the context of {self.n_ctx} tokens is full")
        self.capture_layers = False
        try:
            self._decode_tokens(tokens, state["n_past"], False, every_logit=True)
        finally:
            self.capture_layers = True
        rows = np.empty((n, self.n_vocab), np.float32)
        for j in range(n):
            rows[j] = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
        state["n_past"] += n
        state["drafted"] = 0
        return rows

    def _rollback(self, state, n: int) -> None:
        state["drafted"] = 0
        if n < state["n_past"]:
            self._ll.llama_memory_seq_rm(self._ll.llama_get_memory(self.ctx), 0, n, -1)
        self._draft.cut(n)
        state["n_past"] = n

    def _keep(self, state, keys: list) -> None:
        if state.get("draft") and self._draft is not None:
            self._draft.keys = list(keys)  # both contexts hold the same positions after a cycle
        super()._keep(state, keys)

    def pieces_text(self, ids) -> str:
        """The text llama.cpp's own tools print for ``ids``: each token's piece, special tokens
        included, as bytes joined and then read as UTF-8 (a bad byte as U+FFFD)."""
        buf = ctypes.create_string_buffer(256)
        out = b""
        for token in ids:
            n = self._ll.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, True)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)
