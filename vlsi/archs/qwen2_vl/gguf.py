"""Qwen2-VL's GGUF part: llama.cpp's ``qwen2vl`` text model and ``qwen2vl_merger`` projector."""

from __future__ import annotations

from ..gguf import GgufParts

# transformers' Qwen2-VL / Qwen2.5-VL language model -> llama.cpp's `qwen2vl` text model
QWEN2VL_TEXT: list[tuple[str, str | None]] = [
    ("model.language_model.embed_tokens.weight", "token_embd.weight"),
    ("model.language_model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),  # left out when tied to the embedding
    ("model.language_model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight"),
    ("model.language_model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
    ("model.language_model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias"),
    ("model.language_model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
    ("model.language_model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias"),
    ("model.language_model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
    ("model.language_model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias"),
    ("model.language_model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
    ("model.language_model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight"),
    ("model.language_model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
    ("model.language_model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
    ("model.language_model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
    ("model.visual.{rest}", None),  # the vision tower goes to the mmproj file
]


# the vision tower and merger -> llama.cpp's clip projector file (mmproj), both generations
QWEN2VL_VISION: list[tuple] = [
    ("model.language_model.{rest}", None),  # the text model goes to the other file
    ("lm_head.weight", None),
    ("model.visual.patch_embed.proj.weight", "v.patch_embd.weight", "temporal"),
    ("model.visual.blocks.{bid}.norm1.weight", "v.blk.{bid}.ln1.weight"),
    ("model.visual.blocks.{bid}.norm1.bias", "v.blk.{bid}.ln1.bias"),  # LayerNorm (2-VL) only
    ("model.visual.blocks.{bid}.norm2.weight", "v.blk.{bid}.ln2.weight"),
    ("model.visual.blocks.{bid}.norm2.bias", "v.blk.{bid}.ln2.bias"),
    ("model.visual.blocks.{bid}.attn.qkv.weight", "v.blk.{bid}.attn_{qkv}.weight", "split3"),
    ("model.visual.blocks.{bid}.attn.qkv.bias", "v.blk.{bid}.attn_{qkv}.bias", "split3"),
    ("model.visual.blocks.{bid}.attn.proj.weight", "v.blk.{bid}.attn_out.weight"),
    ("model.visual.blocks.{bid}.attn.proj.bias", "v.blk.{bid}.attn_out.bias"),
    ("model.visual.blocks.{bid}.mlp.fc1.weight", "v.blk.{bid}.ffn_up.weight"),  # 2-VL: GELU MLP
    ("model.visual.blocks.{bid}.mlp.fc1.bias", "v.blk.{bid}.ffn_up.bias"),
    ("model.visual.blocks.{bid}.mlp.fc2.weight", "v.blk.{bid}.ffn_down.weight"),
    ("model.visual.blocks.{bid}.mlp.fc2.bias", "v.blk.{bid}.ffn_down.bias"),
    ("model.visual.blocks.{bid}.mlp.gate_proj.weight", "v.blk.{bid}.ffn_gate.weight"),  # 2.5-VL: SwiGLU
    ("model.visual.blocks.{bid}.mlp.gate_proj.bias", "v.blk.{bid}.ffn_gate.bias"),
    ("model.visual.blocks.{bid}.mlp.up_proj.weight", "v.blk.{bid}.ffn_up.weight"),
    ("model.visual.blocks.{bid}.mlp.up_proj.bias", "v.blk.{bid}.ffn_up.bias"),
    ("model.visual.blocks.{bid}.mlp.down_proj.weight", "v.blk.{bid}.ffn_down.weight"),
    ("model.visual.blocks.{bid}.mlp.down_proj.bias", "v.blk.{bid}.ffn_down.bias"),
    ("model.visual.merger.ln_q.weight", "v.post_ln.weight"),
    ("model.visual.merger.ln_q.bias", "v.post_ln.bias"),
    ("model.visual.merger.mlp.0.weight", "mm.0.weight"),
    ("model.visual.merger.mlp.0.bias", "mm.0.bias"),
    ("model.visual.merger.mlp.2.weight", "mm.2.weight"),
    ("model.visual.merger.mlp.2.bias", "mm.2.bias"),
]


class Qwen2VLGguf(GgufParts):
    text_arch = "qwen2vl"
    projector_type = "qwen2vl_merger"
    text_table = QWEN2VL_TEXT
    vision_table = QWEN2VL_VISION
    vision_act = "quick_gelu"
    # llama.cpp's tools/mtmd/clip.cpp, PROJECTOR_TYPE_QWEN2VL / QWEN25VL: set_limit_image_tokens(8, 4096);
    # clip.vision.image_min/max_pixels are not read for these projectors (llama-cpp-python 0.3.36)
    clip_image_tokens = (8, 4096)

    def text_hparams(self, w, config, sizes) -> None:
        """The text model's hyper-parameters, with M-RoPE's sections."""
        from vlsi.errors import ConfigError

        tc = config.get_text_config()
        rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
        sections = list(rope.get("mrope_section") or [])
        if len(sections) != 3 or 2 * sum(sections) != sizes.head_dim:
            raise ConfigError(f"mrope_section {sections} does not split head_dim {sizes.head_dim} in three")
        w.add_context_length(int(tc.max_position_embeddings))
        w.add_embedding_length(sizes.hidden_size)
        w.add_block_count(sizes.num_layers)
        w.add_feed_forward_length(int(tc.intermediate_size))
        w.add_head_count(sizes.num_heads)
        w.add_head_count_kv(sizes.num_kv_heads)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
        w.add_rope_dimension_sections([*sections, 0])

    def vision_widths(self, vc) -> tuple[int, int]:
        """(width, MLP width) of the vision blocks."""
        return int(vc.embed_dim), int(vc.embed_dim * vc.mlp_ratio)

    def vision_problems(self, vc) -> list[str]:
        """What in this vision config llama.cpp's clip would run differently from transformers."""
        problems = []
        if getattr(vc, "temporal_patch_size", 2) != 2:
            problems.append(f"temporal_patch_size {vc.temporal_patch_size} (clip runs exactly 2 frames)")
        if getattr(vc, "spatial_merge_size", 2) != 2:
            problems.append(f"spatial_merge_size {vc.spatial_merge_size} (clip merges 2x2 patches)")
        width, inner = self.vision_widths(vc)
        heads = int(vc.num_heads)
        if (width // heads) % 4:
            problems.append(f"vision head width {width // heads} (clip's 2-D rope needs a multiple of 4)")
        if inner == width:
            problems.append(f"vision MLP width {inner} equal to the vision width (clip would take up for down)")
        act = getattr(vc, "hidden_act", self.vision_act)
        if act != self.vision_act:
            problems.append(f"vision activation {act!r} (clip runs {self.vision_act} for this projector)")
        return problems

    def vision_hparams(self, w, config) -> None:
        """The projector's hyper-parameters after :meth:`vision_problems` found none."""
        vc = config.vision_config
        self.refuse(self.vision_problems(vc))
        width, inner = self.vision_widths(vc)
        w.add_uint32("clip.vision.embedding_length", width)
        w.add_uint32("clip.vision.feed_forward_length", inner)
        w.add_uint32("clip.vision.block_count", int(vc.depth))
        w.add_uint32("clip.vision.attention.head_count", int(vc.num_heads))
        w.add_uint32("clip.vision.spatial_merge_size", int(vc.spatial_merge_size))

    def image_hparams(self, w, pre: dict) -> None:
        """The processor's pixel bounds as clip's ``image_min/max_pixels`` keys, for llama.cpp
        versions that read them for this projector (the one llama-cpp-python 0.3.36 ships does
        not: it uses :attr:`clip_image_tokens`, see :meth:`clip_resize`)."""
        from .image import Qwen2VLImageSpec

        spec = Qwen2VLImageSpec.from_preprocessor_config(pre)
        w.add_uint32("clip.vision.image_min_pixels", spec.min_pixels)
        w.add_uint32("clip.vision.image_max_pixels", spec.max_pixels)

    def image_token_limits(self, pre: dict) -> dict:
        """Image token bounds from the processor config, for mtmd's image_min/max_tokens (so
        llama.cpp resizes images to the sizes the model was trained on): the fewest tokens an
        image may have without being grown, the most without being shrunk."""
        from .image import Qwen2VLImageSpec

        spec = Qwen2VLImageSpec.from_preprocessor_config(pre)
        unit = spec.factor ** 2
        return {"image_min_tokens": max(1, -(-spec.min_pixels // unit)),
                "image_max_tokens": max(1, spec.max_pixels // unit)}

    def clip_resize(self, pre: dict) -> dict:
        """How llama.cpp's clip sizes images for this projector against the model's processor.

        Both pick the size the same way (sides multiples of 28, pixel count within bounds, the
        same Pillow-exact bicubic filter), but clip's bounds are :attr:`clip_image_tokens` unless
        the caller passes ``image_min/max_tokens``. Returns ``{"clip_image_tokens",
        "processor_image_tokens", "differs"}`` and, when they differ, ``"resized_differently"``
        (which images) and ``"flags"`` (what makes llama.cpp's tools agree)."""
        from .image import Qwen2VLImageSpec

        lo, hi = self.clip_image_tokens
        unit = Qwen2VLImageSpec.from_preprocessor_config(pre).factor ** 2
        limits = self.image_token_limits(pre)
        plo, phi = limits["image_min_tokens"], limits["image_max_tokens"]
        out = {"clip_image_tokens": [lo, hi], "processor_image_tokens": [plo, phi], "differs": (plo, phi) != (lo, hi)}
        if not out["differs"]:
            return out
        which = []
        if plo != lo:
            n = max(plo, lo)
            which.append(f"smaller than about {n * unit} pixels ({n} image tokens)")
        if phi != hi:
            n = min(phi, hi)
            which.append(f"larger than about {n * unit} pixels ({n} image tokens)")
        out["resized_differently"] = "images " + " or ".join(which)
        out["flags"] = f"--image-min-tokens {plo} --image-max-tokens {phi}"
        return out
