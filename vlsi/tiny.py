"""Tiny teacher and student models built from configs, offline and seeded.

Sizes are chosen so the synthetic task learns on a 2-core CPU in minutes: the teacher is
wider and deeper than the student; every vision tower is at least 3 blocks deep (llama.cpp's
Qwen2-VL projector needs it); ``k256`` has text widths that are multiples of 256 so
llama.cpp's K-quants apply to every text matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class TinySpec:
    hidden: int
    """Text hidden width (also the vision merger's output width)."""
    layers: int
    """Decoder layers."""
    heads: int
    """Attention heads (head_dim = hidden / heads)."""
    kv_heads: int
    """Key/value heads (grouped-query attention)."""
    intermediate: int
    """Decoder MLP width."""
    vision_embed: int
    """Vision tower width."""
    vision_depth: int
    """Vision tower blocks (>= 3 for llama.cpp's mmproj)."""
    vision_heads: int
    """Vision attention heads."""
    vision_mlp_ratio: int = 2
    """Vision MLP expansion; an integer (transformers refuses floats here)."""
    rope_theta: float = 10000.0
    """Rotary base of the decoder."""
    image_size: int = 84
    """Square image side the model is built for (multiple of 28). Qwen2-VL processors keep any
    image between llama.cpp's image token bounds (see :func:`tiny_image_processor`), so a side
    below 84 px (8 merged tokens) is upscaled to 84."""


SIZES: dict[str, TinySpec] = {
    "teacher": TinySpec(hidden=192, layers=8, heads=6, kv_heads=2, intermediate=512,
                        vision_embed=128, vision_depth=4, vision_heads=4),
    "student": TinySpec(hidden=96, layers=6, heads=3, kv_heads=1, intermediate=256,
                        vision_embed=64, vision_depth=3, vision_heads=2),
    "k256": TinySpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768,
                     vision_embed=64, vision_depth=3, vision_heads=2),
    # The quickstart's pair: 84 px images on a 3x3 grid (one merged image token per cell), a
    # small rope theta so positions are visible at head_dim 32, and a student with a much
    # weaker vision tower (the perception gap distillation has to close).
    "qs_teacher": TinySpec(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                           vision_embed=64, vision_depth=3, vision_heads=2, rope_theta=10.0, image_size=84),
    "qs_student": TinySpec(hidden=64, layers=4, heads=2, kv_heads=1, intermediate=128,
                           vision_embed=16, vision_depth=3, vision_heads=1, rope_theta=10.0, image_size=84),
}


def token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens adapters place, from a ``tokenizers`` or transformers tokenizer."""
    conv = getattr(tokenizer, "token_to_id", None) or tokenizer.convert_tokens_to_ids
    names = {
        "pad": "<|endoftext|>", "eos": "<|im_end|>", "im_start": "<|im_start|>",
        "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
        "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>",
        "image": "<image>", "video": "<video>",
    }
    out = {}
    for key, tok in names.items():
        i = conv(tok)
        if i is None:
            raise ConfigError(f"the tokenizer has no {tok!r} token; vlsi needs Qwen2-VL's special tokens")
        out[key] = int(i)
    return out


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for ``n`` tokens, rounded up as Qwen's checkpoints do."""
    return (n + multiple - 1) // multiple * multiple


def default_tokenizer():
    """The shared tiny tokenizer, trained on the synthetic corpus (deterministic)."""
    from .data.synth import corpus_texts
    from .tokenizer import build_tokenizer

    return build_tokenizer(corpus_texts())


def build_tiny(arch: str = "qwen2_vl", size: str | TinySpec = "student", seed: int = 0, tokenizer=None,
               vocab_size: int | None = None):
    """Build a randomly initialised tiny model.

    Returns ``(model, tokenizer, image_processor, spec)``; ``tokenizer`` is a
    ``tokenizers.Tokenizer`` (the default synthetic one unless given). ``vocab_size`` sets the
    embedding's rows (default: the tokenizer's size rounded up by :func:`padded_vocab`); more
    rows than tokens is a padded vocabulary, as real Qwen2-VL has (151,936 rows, 151,646 tokens).
    """
    import torch

    from .archs import get_adapter

    adapter = get_adapter(arch)
    if isinstance(size, str):
        if size not in SIZES:
            raise ConfigError(f"unknown tiny size {size!r}; choose one of: {', '.join(SIZES)}")
        spec = SIZES[size]
    else:
        spec = size
    tok = tokenizer if tokenizer is not None else default_tokenizer()
    n_tokens = tok.get_vocab_size()
    if vocab_size is None:
        vocab_size = padded_vocab(n_tokens)
    elif vocab_size < n_tokens:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
    config = adapter.tiny_config(spec, int(vocab_size), token_ids(tok))
    torch.manual_seed(seed)
    model = adapter.model_class()(config)
    model.eval()
    return model, tok, tiny_image_processor(arch, spec.image_size), spec


def tiny_image_processor(arch: str, image_size: int):
    """The tiny image processor of ``arch``. Where llama.cpp's clip fixes the image token bounds
    for the architecture's projector (Qwen2-VL: every image resized to 8..4096 merged tokens,
    whatever the mmproj says, and llama-cpp-python's ``MTMDChatHandler`` has no setting for
    them), the processor takes exactly those bounds, so that llama.cpp's own tools and the
    model resize every image to the same size (a 56 px square to 84 px: 9 tokens, not 4)."""
    from .archs import get_adapter, get_arch

    adapter = get_adapter(arch)
    proc = adapter.tiny_image_processor(image_size)
    if "gguf" not in get_arch(arch).targets:
        return proc
    from .archs import get_export

    bounds = get_export(arch, "gguf").clip_image_tokens
    if bounds is None:
        return proc
    unit = (int(proc.patch_size) * int(proc.merge_size)) ** 2
    lo, hi = bounds
    return type(proc).from_dict({**proc.to_dict(), "size": {"shortest_edge": lo * unit, "longest_edge": hi * unit}})


def save_tiny(out_dir: str | Path, arch: str = "qwen2_vl", size: str = "student", seed: int = 0,
              verbalizer_layers=None, verbalizer_arch: str = "verb_ffn", overwrite: bool = False) -> Path:
    """Build a tiny model (optionally with untrained verbalizers) and save it as a checkpoint folder."""
    from .checkpoint import save_checkpoint

    model, tok, proc, spec = build_tiny(arch, size, seed)
    verbalizers = None
    if verbalizer_layers is not None:
        from .archs import get_adapter
        from .verbalizer import VerbalizerConfig, Verbalizers, parse_target_layers

        n = get_adapter(model).text_sizes(model.config).num_layers
        cfg = VerbalizerConfig(parse_target_layers(verbalizer_layers, n), arch=verbalizer_arch)
        verbalizers = Verbalizers.for_model(model, cfg)
    provenance = {"built_by": "vlsi.tiny", "arch": arch, "size": size if isinstance(size, str) else "custom",
                  "spec": asdict(spec), "seed": seed}
    return save_checkpoint(out_dir, model, tok, proc, verbalizers=verbalizers, provenance=provenance,
                           overwrite=overwrite)


def param_count(model) -> dict[str, int]:
    """Parameters of the whole model, the text decoder and the vision tower."""
    from .archs import get_adapter

    ad = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in ad.vision_tower(model).parameters())
    return {"total": total, "vision": vision, "text": total - vision}
