"""Verbalizer heads: shapes, variants, and that they never change the backbone's output."""

from __future__ import annotations

import pytest
import torch

from vlsi.adapters import get_adapter
from vlsi.data.encode import Encoder
from vlsi.data.records import Record, Turn
from vlsi.errors import ConfigError
from vlsi.tiny import build_tiny
from vlsi.verbalizer import ARCHS, VerbalizerConfig, Verbalizers, forward_with_verbalizers, parse_target_layers

from .conftest import png_bytes


@pytest.fixture(scope="module")
def setup(tokenizer):
    model, tok, proc, _ = build_tiny("qwen2_vl", "student", seed=0, tokenizer=tokenizer)
    enc = Encoder(get_adapter(model), tok, proc, model.config)
    recs = [Record(id=str(i), turns=(Turn("user", "<image>\nWhat shape" + " is it?" * i), Turn("assistant", "a star.")),
                   images=(png_bytes(color=(10 * i, 100, 50)),), source="mem") for i in range(2)]
    batch = enc.collate([enc.encode(r) for r in recs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model, inputs, batch


def test_parse_target_layers():
    assert parse_target_layers("2::4", 28) == (2, 6, 10, 14, 18, 22, 26)  # the paper's student layers
    assert parse_target_layers("2::4", 80)[-1] == 78 and len(parse_target_layers("2::4", 80)) == 20
    assert parse_target_layers("1,3", 6) == (1, 3)
    assert parse_target_layers([2, 4], 6) == (2, 4)
    with pytest.raises(ConfigError, match="start::step"):
        parse_target_layers("every other", 6)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="target_layers"):
        VerbalizerConfig((0, 6)).validate(6)
    with pytest.raises(ConfigError, match="verbalizer.arch"):
        VerbalizerConfig((1,), arch="transformer").validate(6)
    with pytest.raises(ConfigError, match="depth"):
        VerbalizerConfig((1,), depth=3).validate(6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", [1, 2])
def test_shapes_for_every_variant(setup, arch, depth):
    model, inputs, batch = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3, 5), arch=arch, depth=depth))
    out, logits = forward_with_verbalizers(model, v, **inputs)
    b, length = inputs["input_ids"].shape
    assert set(logits) == {1, 3, 5}
    for x in logits.values():
        assert x.shape == (b, length, model.config.text_config.vocab_size)
        assert torch.isfinite(x).all()
    select = batch["labels"] != -100
    _, sel = forward_with_verbalizers(model, v, select=select, **inputs)
    assert sel[3].shape == (int(select.sum()), model.config.text_config.vocab_size)
    torch.testing.assert_close(sel[3], logits[3][select])
    # the LM head is shared, not copied into the verbalizers
    assert not any(p.shape == model.lm_head.weight.shape for p in v.parameters())


def test_untrained_head_is_the_logit_lens(setup):
    """Zero-initialised last projections: an untrained head is final-norm + LM head on the raw state."""
    model, inputs, _ = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((2,)))
    out = model(**inputs, output_hidden_states=True)
    lens = model.lm_head(model.model.language_model.norm(out.hidden_states[2]))
    _, logits = forward_with_verbalizers(model, v, **inputs)
    torch.testing.assert_close(logits[2], lens, atol=1e-5, rtol=1e-5)


def test_verbalizers_off_equals_plain_model_bit_for_bit(setup):
    model, inputs, _ = setup
    plain = model(**inputs).logits
    off, extra = forward_with_verbalizers(model, None, **inputs)
    assert extra == {}
    assert torch.equal(off.logits, plain)
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch="decoder_block"))
    on, _ = forward_with_verbalizers(model, v, **inputs)
    assert torch.equal(on.logits, plain)  # hooks only read


def test_verbalizers_train_while_backbone_stays_frozen(setup):
    model, inputs, batch = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((1,)))
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(v.parameters(), lr=1e-2)
    select = batch["labels"][:, 1:] != -100
    target = batch["labels"][:, 1:][select]
    losses = []
    for _ in range(15):
        _, logits = forward_with_verbalizers(model, v, **inputs)
        loss = torch.nn.functional.cross_entropy(logits[1][:, :-1][select], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert model.lm_head.weight.grad is None
    for p in model.parameters():
        p.requires_grad_(True)
