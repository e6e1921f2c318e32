"""PyTorch reference backend: the checkpoint itself through transformers."""

from __future__ import annotations

from .base import FINAL, Prompt, Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, folder, device: str = "cpu", parity: bool = False):
        """``parity`` changes nothing: this backend is the reference."""
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
        self.spec = self.ck.adapter.spec
        self.image_spec = self.spec.image_spec(self.ck.path)

    def _images(self, images) -> list:
        """Images through the same decoding, EXIF, RGB and size checks as every backend."""
        from vlsi.images import load_image

        return [load_image(im, self.image_spec) for im in images]

    def _encode(self, images, text):
        from vlsi.data.records import Record

        pil = tuple(self._images(images))
        rec = Record(id="prompt", turns=self.user_turns(pil, text), images=pil, source="prompt")
        e = self.enc.encode(rec, for_generation=True)
        return Prompt(e.input_ids, e)

    def image_embeds(self, images):
        ad = self.ck.adapter
        processed = ad.process_images(self.ck.image_processor, self._images(images))
        with self.torch.inference_mode():
            return ad.image_features(self.model, processed).float().cpu().numpy()

    def _forward(self, run, arg) -> dict:
        """``run(arg)`` (a :class:`~vlsi.verbalizer.VerbalizerTap` prefill or step) as numpy logits."""
        with self.torch.inference_mode():
            final, per_layer = run(arg)
        return {FINAL: final[0].float().numpy(), **{k: v[0].float().numpy() for k, v in per_layer.items()}}

    def _prefill(self, prompt: Prompt):
        from vlsi.verbalizer import VerbalizerTap

        batch = self.enc.collate([prompt.images], pad_left=True)
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        tap = VerbalizerTap(self.model, self.ck.verbalizers)  # the state: KV cache and heads' history
        return tap, self._forward(tap.prefill, inputs)

    def _step(self, tap, token):
        return self._forward(tap.step, self.torch.tensor([token], device=self.device))

    def decode(self, ids):
        return self.ck.tokenizer.decode(ids, skip_special_tokens=True)

