"""PyTorch reference backend: the checkpoint itself through transformers."""

from __future__ import annotations

import io

from .base import FINAL, Prompt, Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, folder, device: str = "cpu"):
        import torch

        from vlsi.checkpoint import load_checkpoint
        from vlsi.data.encode import Encoder

        self.torch = torch
        self.ck = load_checkpoint(folder, device=device)
        self.model = self.ck.model
        self.enc = Encoder(self.ck.adapter, self.ck.tokenizer, self.ck.image_processor, self.model.config,
                           max_length=1 << 16)
        self.eos_ids = tuple(self.enc.eos_ids)
        self.verbalizer_layers = self.ck.verbalizers.target_layers if self.ck.verbalizers is not None else ()
        self.device = device

    def _encode(self, images, text):
        from vlsi.data.records import Record

        refs = []
        for im in images:
            if hasattr(im, "save"):  # a PIL image: hand the loader encoded bytes like any file
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                im = buf.getvalue()
            refs.append(im)
        rec = Record(id="prompt", turns=self.user_turns(refs, text), images=tuple(refs), source="prompt")
        e = self.enc.encode(rec, for_generation=True)
        return Prompt(e.input_ids, e)

    def _forward(self, state, inputs):
        from vlsi.adapters import get_adapter
        from vlsi.verbalizer import LayerTap

        torch = self.torch
        with torch.inference_mode(), LayerTap(self.model, self.verbalizer_layers) as hidden:
            out = self.model(**inputs, cache=state.get("cache"), use_cache=True, logits_to_keep=1)
        state["cache"] = out.cache
        res = {FINAL: out.logits[0, -1].float().numpy()}
        head = get_adapter(self.model).lm_head(self.model)
        with torch.inference_mode():
            for k in self.verbalizer_layers:
                res[k] = head(self.ck.verbalizers.heads[str(k)](hidden[k][:, -1:]))[0, -1].float().numpy()
        return res

    def _prefill(self, prompt: Prompt):
        batch = self.enc.collate([prompt.images], pad_left=True)
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        state = {"mask": inputs["attention_mask"], "pos": inputs["position_ids"]}
        return state, self._forward(state, inputs)

    def _step(self, state, token):
        torch = self.torch
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        state["pos"] = state["pos"].max(dim=-1, keepdim=True).values + 1
        ids = torch.tensor([[token]], device=self.device)
        return self._forward(state, {"input_ids": ids, "attention_mask": state["mask"], "position_ids": state["pos"]})

    def _decode(self, ids):
        return self.ck.tokenizer.decode(ids, skip_special_tokens=True)

