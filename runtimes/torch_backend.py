"""PyTorch reference backend: the checkpoint itself through transformers."""

from __future__ import annotations

from .base import FINAL, Prompt, Runtime, image_digest, image_spans


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
        text_config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        self.context_length = getattr(text_config, "max_position_embeddings", None)

    def _images(self, images) -> list:
        """Images through the same decoding, EXIF, RGB and size checks as every backend."""
        from vlsi.images import load_image

        return [load_image(im, self.image_spec) for im in images]

    def _encode(self, turns, images):
        from vlsi.data.records import Record

        pil = tuple(self._images(images))
        rec = Record(id="prompt", turns=tuple(turns), images=pil, source="prompt")
        e = self.enc.encode(rec, for_generation=True)
        spans = []
        if pil:
            counts = self.ck.adapter.image_token_counts(self.model.config, self.ck.image_processor, e.processed)
            spans = image_spans(e.input_ids, self.enc.image_token_id, counts)
        return Prompt(e.input_ids, e, spans, [image_digest(im) for im in pil], list(pil))

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
        tap.spans = list(prompt.spans)  # how its images were laid out (checked by _resume)
        return tap, self._forward(tap.prefill, inputs)

    def _resume(self, tap, n, prompt):
        """Keep the first ``n`` positions of ``tap`` and prefill the rest of ``prompt``: its
        tokens at their positions in the whole prompt (Qwen2-VL's M-RoPE ones depend on every
        image before), and only the images that lie there encoded."""
        if any(first < n and (first, count) not in getattr(tap, "spans", ()) for first, count in prompt.spans):
            # an image in the kept prefix took other tokens in the cached sequence (LLaVA-OneVision
            # tiles a lone image but not one of several): its cached encoding is not this prompt's
            raise NotImplementedError
        batch = self.enc.collate([prompt.images], pad_left=True)  # the whole prompt's ids and positions
        inputs = {"input_ids": batch["input_ids"][:, n:], "position_ids": batch["position_ids"][..., n:],
                  **self._image_inputs(prompt, n, batch)}
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        tap.spans = list(prompt.spans)
        return tap, self._forward(lambda x: tap.resume(n, x), inputs)

    def _image_inputs(self, prompt: Prompt, n: int, batch: dict) -> dict:
        """The forward's image arguments for the images of ``prompt`` at or after position ``n``."""
        new = [k for k, (first, _) in enumerate(prompt.spans) if first >= n]
        if not new:
            return {}
        ad, proc = self.ck.adapter, self.ck.image_processor
        if len(new) == len(prompt.spans):  # all of them: as the full prefill passes them
            text = ("input_ids", "attention_mask", "labels", "position_ids")
            return {k: v for k, v in batch.items() if k not in text}
        counts = [prompt.spans[k][1] for k in new]
        processed = ad.process_images(proc, [prompt.sources[k] for k in new])
        if ad.image_token_counts(self.model.config, proc, processed) == counts:
            return ad.forward_image_kwargs(processed)
        # These images alone are encoded otherwise than among the prompt's others (LLaVA-OneVision
        # tiles a lone image, not one of several): encode all as the full prefill does, keep the new.
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        with self.torch.inference_mode():
            feats = ad.image_features(self.model, prompt.images.processed)
        starts = [0]
        for _, count in prompt.spans:
            starts.append(starts[-1] + count)
        keep = self.torch.cat([feats[starts[k]:starts[k + 1]] for k in new])
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[keep])}}

    def _step(self, tap, token):
        return self._forward(tap.step, self.torch.tensor([token], device=self.device))

    def decode(self, ids):
        return self.ck.tokenizer.decode(ids, skip_special_tokens=True)

