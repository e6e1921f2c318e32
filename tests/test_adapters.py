"""Every registered adapter is built tiny and run forward with an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsi.archs import get_adapter, supported
from vlsi.data.encode import IGNORE_INDEX, Encoder
from vlsi.data.records import Record, Turn
from vlsi.errors import UnsupportedArchitectureError
from vlsi.tiny import SIZES, build_tiny, param_count

from .conftest import png_bytes


def _record(n_images=1, size=(84, 84)):
    text = "<image>\n" * n_images + "What colour is the star?"
    return Record(id="r0", turns=(Turn("user", text), Turn("assistant", "red.")),
                  images=tuple(png_bytes(size) for _ in range(n_images)), source="mem", answer="red.")


def test_registry_lists_the_three_architectures():
    assert set(supported()) == {"qwen2_vl", "qwen2_5_vl", "llava_onevision"}


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter("mllama")
    for name in supported():
        assert name in str(e.value)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_every_adapter_runs_forward_with_an_image(arch, tokenizer):
    model, tok, proc, _ = build_tiny(arch, "student", seed=0, tokenizer=tokenizer)
    ad = get_adapter(model)
    assert ad.name == arch
    # the parts the trainer and exporters reach through the adapter
    n_layers = ad.text_sizes(model.config).num_layers
    assert len(ad.decoder_layers(model)) == n_layers == SIZES["student"].layers
    assert ad.final_norm(model).weight.shape == (SIZES["student"].hidden,)
    assert ad.lm_head(model).weight.shape[0] == model.config.text_config.vocab_size
    assert ad.embed_tokens(model).weight.shape[1] == SIZES["student"].hidden
    assert any(True for _ in ad.vision_tower(model).parameters())
    assert any(True for _ in ad.projector(model).parameters())

    enc = Encoder(ad, tok, proc, model.config)
    batch = enc.collate([enc.encode(_record())])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    # the image changed the output: a different image gives different logits
    other = Record(**{**_record().__dict__, "images": (png_bytes(color=(20, 200, 40)),)})
    b2 = enc.collate([enc.encode(other)])
    with torch.no_grad():
        out2 = model(**{k: v for k, v in b2.items() if k != "labels"})
    assert not torch.allclose(out.logits, out2.logits)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("size", [(84, 84), (56, 112), (112, 56)])
def test_image_token_count_matches_the_features_the_model_makes(arch, size, tokenizer):
    model, tok, proc, _ = build_tiny(arch, "student", seed=0, tokenizer=tokenizer)
    ad = get_adapter(model)
    enc = Encoder(ad, tok, proc, model.config)
    e = enc.encode(_record(size=size))
    n_tokens = sum(1 for t in e.input_ids if t == enc.image_token_id)
    with torch.no_grad():
        feats = model.get_image_features(**ad.forward_image_kwargs(e.processed))
    pooled = feats.pooler_output
    n_feats = sum(f.shape[0] for f in pooled) if isinstance(pooled, (list, tuple)) else pooled.shape[0]
    assert n_tokens == n_feats


def test_two_images_in_one_prompt(tokenizer):
    model, tok, proc, _ = build_tiny("qwen2_vl", "student", seed=0, tokenizer=tokenizer)
    enc = Encoder(get_adapter(model), tok, proc, model.config)
    batch = enc.collate([enc.encode(_record(n_images=2)), enc.encode(_record(n_images=1))])
    assert batch["image_grid_thw"].shape == (3, 3)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert torch.isfinite(out.logits).all()


def test_sizes_teacher_larger_and_deeper_than_student(tokenizer):
    t, s = SIZES["teacher"], SIZES["student"]
    assert t.hidden > s.hidden and t.layers > s.layers
    assert min(x.vision_depth for x in SIZES.values()) >= 3
    k = SIZES["k256"]
    assert k.hidden % 256 == 0 and k.intermediate % 256 == 0
    counts = {name: param_count(build_tiny("qwen2_vl", name, tokenizer=tokenizer)[0])["total"] for name in SIZES}
    assert counts["teacher"] > 3 * counts["student"]


def test_encoding_matches_the_chat_template(tokenizer, tmp_path):
    """Our prompt layout equals transformers' chat template, with the image run expanded."""
    from transformers import AutoTokenizer

    from vlsi.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    model, tok, proc, _ = build_tiny("qwen2_vl", "student", seed=0, tokenizer=tokenizer)
    enc = Encoder(get_adapter(model), tok, proc, model.config)
    e = enc.encode(_record())
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]},
            {"role": "assistant", "content": "red."}]
    text = hf.apply_chat_template(msgs, tokenize=False)
    n = sum(1 for t in e.input_ids if t == enc.image_token_id)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert e.input_ids == hf(text, add_special_tokens=False).input_ids
    # labels: exactly the assistant answer and its end-of-turn token
    kept = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    assert hf.decode(kept) == "red.<|im_end|>"


def test_left_padded_generation_positions(tokenizer):
    """Left padding must not change what a row computes: positions skip the pads."""
    model, tok, proc, _ = build_tiny("qwen2_vl", "student", seed=0, tokenizer=tokenizer)
    enc = Encoder(get_adapter(model), tok, proc, model.config)
    short = enc.encode(_record(), for_generation=True)
    long_rec = Record(**{**_record().__dict__, "turns": (Turn("user", "<image>\nWhat colour is the big star in the picture?"),)})
    long = enc.encode(long_rec, for_generation=True)
    alone = enc.collate([short], pad_left=True)
    both = enc.collate([short, long], pad_left=True)
    assert np.array_equal(both["position_ids"][:, 0, -len(short.input_ids):].numpy(), alone["position_ids"][:, 0].numpy())
    with torch.no_grad():
        a = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0, -1]
        b = model(**{k: v for k, v in both.items() if k != "labels"}).logits[0, -1]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
