"""Build the benchmark-size model: a Qwen2-0.5B-shaped decoder (hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings) with a small vision
tower and random weights, saved as a vlsi checkpoint.

    python scripts/make_bench_model.py --out runs/bench/model
    vlsi export --model runs/bench/model --target onnx --out runs/bench/int8 --quant int8 --no-validate
    vlsi bench runs/bench/int8 --reference runs/bench/model --threads 2

With ``--verbalizers 6,12,18`` the checkpoint also holds untrained verb_ffn heads on those
layers (each the logit lens until trained: its last projection starts at zero), for timing
artifacts exported with and without ``--verbalizers``, alternating in one run:

    python scripts/make_bench_model.py --out runs/bench/model-verb --verbalizers 6,12,18
    vlsi export --model runs/bench/model-verb --target onnx --out runs/bench/int8-plain --quant int8 --no-validate
    vlsi export --model runs/bench/model-verb --target onnx --out runs/bench/int8-verb --quant int8 --no-validate \
        --verbalizers
    vlsi bench runs/bench/int8-plain runs/bench/int8-verb --reference runs/bench/model-verb --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse

import torch

from vlsi.archs import get_adapter
from vlsi.checkpoint import save_checkpoint
from vlsi.tiny import TinySpec, default_tokenizer, tiny_image_processor, token_ids

SPEC = TinySpec(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                vision_embed=128, vision_depth=3, vision_heads=4, rope_theta=1_000_000.0, image_size=56)
VOCAB = 151936


def build(seed: int = 0):
    tok = default_tokenizer()
    ad = get_adapter("qwen2_vl")
    config = ad.tiny_config(SPEC, VOCAB, token_ids(tok))
    config.tie_word_embeddings = True
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = ad.model_class()(config).eval()
    return model, tok, tiny_image_processor("qwen2_vl", SPEC.image_size)  # llama.cpp clip's token bounds


def heads(model, layers: str):
    """Untrained verb_ffn heads on ``layers`` (e.g. ``"6,12,18"``) sized for ``model``."""
    from vlsi.verbalizer import VerbalizerConfig, Verbalizers, parse_target_layers

    cfg = VerbalizerConfig(parse_target_layers(layers, SPEC.layers), arch="verb_ffn")
    return Verbalizers.for_model(model, cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbalizers", default=None, help="Target layers of untrained verb_ffn heads, e.g. 6,12,18.")
    a = p.parse_args()
    model, tok, proc = build(a.seed)
    n = sum(x.numel() for x in model.parameters())
    verbs = heads(model, a.verbalizers) if a.verbalizers else None
    save_checkpoint(a.out, model, tok, proc, verbalizers=verbs,
                    provenance={"built_by": "scripts/make_bench_model.py", "params": n})
    print(f"wrote {a.out}: {n / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
