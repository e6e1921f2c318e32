"""Qwen2.5-VL's GGUF part: the ``qwen2vl`` text model, and the ``qwen2.5vl_merger`` projector
with SwiGLU blocks and window attention every n-th block."""

from __future__ import annotations

from ..qwen2_vl.gguf import Qwen2VLGguf


class Qwen25VLGguf(Qwen2VLGguf):
    projector_type = "qwen2.5vl_merger"
    vision_act = "silu"

    def vision_widths(self, vc):
        return int(vc.hidden_size), int(vc.intermediate_size)

    def window_pattern(self, vc) -> int:
        """clip's ``n_wa_pattern``: every n-th block attends over the whole image."""
        full = list(getattr(vc, "fullatt_block_indexes", []))
        return full[0] + 1 if full else 0

    def vision_problems(self, vc):
        problems = super().vision_problems(vc)
        if int(getattr(vc, "window_size", 112)) != 112:
            problems.append(f"window_size {vc.window_size} (clip's window attention is fixed at 112 pixels)")
        full, pattern = list(getattr(vc, "fullatt_block_indexes", [])), self.window_pattern(vc)
        if not full or full != list(range(pattern - 1, int(vc.depth), pattern)):
            problems.append(f"fullatt_block_indexes {full} (clip needs every n-th block, n = first index + 1)")
        return problems

    def vision_hparams(self, w, config):
        super().vision_hparams(w, config)
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.n_wa_pattern", self.window_pattern(config.vision_config))
