"""ONNX Runtime backend. Imports neither torch nor transformers: an edge install is
``tokenizers`` + numpy + Pillow + onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsi.chat import chat_ids, expand_images
from vlsi.manifest import load_manifest
from vlsi.mrope import mrope_positions, vision_inputs
from vlsi.preprocess import Qwen2VLImageSpec, load_image, num_image_tokens, preprocess_images

from .base import FINAL, Prompt, Runtime

IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


def default_providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build has."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, folder, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if self.manifest.get("target") != "onnx":
            from vlsi.manifest import ArtifactError

            raise ArtifactError(f"{self.folder} is a {self.manifest.get('target')!r} artifact, not an ONNX one")
        m = self.manifest["model"]
        self.n_layers, self.kv_heads, self.head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]
        self.image_token_id, self.merge = m["image_token_id"], m["spatial_merge_size"]
        self.verbalizer_layers = tuple(self.manifest.get("verbalizers", []))
        self.eos_ids = tuple(self.manifest["eos_token_ids"])
        self.tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.spec = Qwen2VLImageSpec.from_preprocessor_config(self.folder / "preprocessor_config.json")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or default_providers()
        g = self.manifest["graphs"]
        self.vision = ort.InferenceSession(str(self.folder / g["vision"]["file"]), opts, providers=self.providers)
        self.embed = ort.InferenceSession(str(self.folder / g["embed"]["file"]), opts, providers=self.providers)
        self.decoder = ort.InferenceSession(str(self.folder / g["decoder"]["file"]), opts, providers=self.providers)
        self.out_names = [o.name for o in self.decoder.get_outputs()]
        self.n_logits = 1 + len(self.verbalizer_layers)

    # ------------------------------------------------------------------ pieces
    def _encode(self, images, text):
        pil = [load_image(im, self.spec) for im in images]
        ids, _ = chat_ids(self.tok, self.user_turns(pil, text), IMAGE_MARKER, for_generation=True)
        pixels = grids = None
        if pil:
            pixels, grids = preprocess_images(pil, self.spec)
            ids, _ = expand_images(ids, [0] * len(ids), self.image_token_id,
                                   [num_image_tokens(g, self.merge) for g in grids])
        return Prompt(ids, (pixels, grids))

    def image_embeds(self, pixels: np.ndarray, grids: np.ndarray) -> np.ndarray:
        pos, seg = vision_inputs(grids, self.merge)
        return self.vision.run(None, {"pixel_values": pixels.astype(np.float32), "positions": pos, "image_index": seg})[0]

    def _run(self, state, embeds, positions):
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, state["length"] + embeds.shape[1]), np.int64),
                "position_ids": positions}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = state["past"][i]
        outs = self.decoder.run(None, feed)
        state["past"] = [(outs[self.n_logits + 2 * i], outs[self.n_logits + 2 * i + 1]) for i in range(self.n_layers)]
        state["length"] += embeds.shape[1]
        res = {FINAL: outs[0][0]}
        for k, layer in enumerate(self.verbalizer_layers):
            res[layer] = outs[1 + k][0]
        return res

    def _prefill(self, prompt: Prompt):
        ids = np.asarray([prompt.ids], dtype=np.int64)
        embeds = self.embed.run(None, {"input_ids": ids})[0]
        pixels, grids = prompt.images
        if pixels is not None:
            img = self.image_embeds(pixels, grids)
            mask = ids[0] == self.image_token_id
            embeds[0, mask] = img
        pos, deltas = mrope_positions(ids, self.image_token_id, grids if grids is not None else np.zeros((0, 3)),
                                      self.merge)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        state = {"past": [(empty, empty)] * self.n_layers, "length": 0, "next_pos": int(pos.max()) + 1}
        return state, self._run(state, embeds.astype(np.float32), pos)

    def _step(self, state, token):
        emb = self.embed.run(None, {"input_ids": np.array([[token]], np.int64)})[0]
        pos = np.full((3, 1, 1), state["next_pos"], np.int64)
        state["next_pos"] += 1
        return self._run(state, emb, pos)

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)
