"""Verbalizer heads: shapes, variants, and that they never change the backbone's output."""

from __future__ import annotations

import pytest
import torch

from vlsi.archs import get_adapter
from vlsi.data.encode import Encoder
from vlsi.data.records import Record, Turn
from vlsi.errors import ConfigError
from vlsi.tiny import build_tiny
from vlsi.verbalizer import ARCHS, VerbalizerConfig, Verbalizers, VerbalizerTap, parse_target_layers

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
    final, logits = VerbalizerTap(model, v).forward(inputs)
    b, length = inputs["input_ids"].shape
    assert set(logits) == {1, 3, 5}
    for x in logits.values():
        assert x.shape == (b, length, model.config.text_config.vocab_size)
        assert torch.isfinite(x).all()
    select = batch["labels"] != -100
    sel_final, sel = VerbalizerTap(model, v).forward(inputs, select)
    assert sel[3].shape == (int(select.sum()), model.config.text_config.vocab_size)
    torch.testing.assert_close(sel[3], logits[3][select])
    torch.testing.assert_close(sel_final, final[select])  # the final head read at the final norm
    # the LM head is shared, not copied into the verbalizers
    assert not any(p.shape == model.lm_head.weight.shape for p in v.parameters())


def test_untrained_head_is_the_logit_lens(setup):
    """Zero-initialised last projections: an untrained head is final-norm + LM head on the raw state."""
    model, inputs, _ = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((2,)))
    out = model(**inputs, output_hidden_states=True)
    lens = model.lm_head(model.model.language_model.norm(out.hidden_states[2]))
    _, logits = VerbalizerTap(model, v).forward(inputs)
    torch.testing.assert_close(logits[2], lens, atol=1e-5, rtol=1e-5)


def test_verbalizers_off_equals_plain_model_bit_for_bit(setup):
    model, inputs, _ = setup
    plain = model(**inputs).logits
    off, extra = VerbalizerTap(model, None).forward(inputs)
    assert extra == {}
    assert torch.equal(off, plain)
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch="decoder_block"))
    on, _ = VerbalizerTap(model, v).forward(inputs)
    assert torch.equal(on, plain)  # hooks only read


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
        _, logits = VerbalizerTap(model, v).forward(inputs)
        loss = torch.nn.functional.cross_entropy(logits[1][:, :-1][select], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert model.lm_head.weight.grad is None
    for p in model.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------- decoding with the heads
def _noise_png(seed: int, size: int = 84) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def decoder_block_ckpt(tmp_path_factory):
    """A tiny checkpoint with ``decoder_block`` heads on layers 1, 3, 5, perturbed off their
    zero initialisation (an untrained block is the identity, so attention would not show)."""
    from safetensors.torch import load_file, save_file

    from vlsi.checkpoint import VERBALIZERS_FILE
    from vlsi.tiny import save_tiny

    path = save_tiny(tmp_path_factory.mktemp("dblock") / "ckpt", arch="qwen2_vl", size="student", seed=0,
                     verbalizer_layers="1::2", verbalizer_arch="decoder_block")
    state = load_file(str(path / VERBALIZERS_FILE))
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in state.items()}
    save_file(state, str(path / VERBALIZERS_FILE), metadata={"format": "pt"})
    return path


def _full_sequence_logits(ck, batch, continuation):
    """Reference: one forward over prompt + continuation (no cache), per-position logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = len(continuation)
    cont = torch.tensor([continuation])
    pos = inputs["position_ids"]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
    inputs["position_ids"] = torch.cat([pos, pos.max(dim=-1, keepdim=True).values + torch.arange(1, n + 1)], dim=-1)
    with torch.no_grad():
        final, per_layer = VerbalizerTap(ck.model, ck.verbalizers).forward(inputs)
    start = batch["input_ids"].shape[1] - 1
    return [{"final": final[0, start + i], **{k: v[0, start + i] for k, v in per_layer.items()}} for i in range(n + 1)]


def test_torch_runtime_decodes_decoder_block_heads_like_generate(decoder_block_ckpt):
    """``vlsi_runtimes`` (torch) and ``greedy_generate`` (``vlsi eval --verbalize``) read the
    same per-layer answers from attention heads, and both equal a full-sequence forward."""
    import vlsi_runtimes
    from vlsi.checkpoint import load_checkpoint
    from vlsi.generate import greedy_generate
    from vlsi_runtimes.base import FINAL, Runtime

    torch.manual_seed(0)
    rt = vlsi_runtimes.load(decoder_block_ckpt, backend="torch")
    assert rt.verbalizer_layers == (1, 3, 5)
    ck = load_checkpoint(decoder_block_ckpt)
    assert ck.verbalizers.cfg.arch == "decoder_block"
    enc = Encoder(ck.adapter, ck.tokenizer, ck.image_processor, ck.model.config)
    images, prompt = [_noise_png(0)], "What shape is it?"
    rec = Record(id="p", turns=Runtime.user_turns(images, prompt), images=tuple(images), source="mem")
    batch = enc.collate([enc.encode(rec, for_generation=True)], pad_left=True)

    continuation = [10, 20, 30, 40]
    got = rt.logits(images, prompt, continuation=continuation)
    want = _full_sequence_logits(ck, batch, continuation)
    assert len(got) == len(want) == len(continuation) + 1
    for g_step, w_step in zip(got, want):
        assert set(g_step) == {FINAL, 1, 3, 5}
        for k in g_step:
            torch.testing.assert_close(torch.from_numpy(g_step[k]), w_step[k].float(), atol=1e-4, rtol=1e-4)

    n = 8
    decoded = 0
    for layer in (1, 3, 5, FINAL):
        ours = list(rt.stream_tokens(images, prompt, n, source=layer))
        ref = greedy_generate(ck.model, batch, n, enc.eos_ids, ck.verbalizers,
                              source=None if layer == FINAL else layer)[0]
        assert ours == ref, f"layer {layer}"
        decoded += len(ours)
    assert decoded >= 8  # the comparison covered real decoding steps, not only an immediate end of turn


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_the_full_sequence(setup, tokenizer, arch):
    """``VerbalizerTap.prefill``/``step`` on a left-padded batch give, at every step, the
    logits a full-sequence forward gives at the newest position, for every head variant
    (``decoder_block`` heads attend over the history the tap keeps, padding masked)."""
    model, _, _ = setup
    proc = build_tiny("qwen2_vl", "student", tokenizer=tokenizer)[2]
    enc = Encoder(get_adapter(model), tokenizer, proc, model.config)
    recs = [Record(id=str(i), turns=(Turn("user", "<image>\nWhat shape" + " is it?" * 2 * i),),
                   images=(png_bytes(color=(90 * i, 100, 50)),), source="mem") for i in range(2)]
    batch = enc.collate([enc.encode(r, for_generation=True) for r in recs], pad_left=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert not bool(inputs["attention_mask"].all())  # rows of different lengths: left padding is exercised
    torch.manual_seed(0)
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch=arch))
    with torch.no_grad():
        for p in v.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = torch.tensor([[11, 12], [21, 22], [31, 32]])  # three steps fed after the prompt
    tap = VerbalizerTap(model, v)
    with torch.no_grad():
        steps = [tap.prefill(inputs)] + [tap.step(t) for t in tokens]
        full = dict(inputs)
        n = len(tokens)
        full["input_ids"] = torch.cat([inputs["input_ids"], tokens.T], dim=1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, n, dtype=torch.long)], dim=1)
        pos = inputs["position_ids"]
        full["position_ids"] = torch.cat([pos, pos.max(dim=-1, keepdim=True).values + torch.arange(1, n + 1)], dim=-1)
        final, per_layer = VerbalizerTap(model, v).forward(full)
    start = inputs["input_ids"].shape[1] - 1
    for i, (f, layers) in enumerate(steps):
        assert set(layers) == {1, 3}
        torch.testing.assert_close(f, final[:, start + i], atol=1e-4, rtol=1e-4)
        for k in (1, 3):
            torch.testing.assert_close(layers[k], per_layer[k][:, start + i], atol=1e-4, rtol=1e-4)


def test_tap_streams_layers_on_demand_and_names_missing_layers(setup):
    model, inputs, batch = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3, 5)))
    select = batch["labels"] != -100
    with torch.no_grad():
        final, eager = VerbalizerTap(model, v).forward(inputs, select)
        final2, lazy = VerbalizerTap(model, v, layers=(3, 5)).forward(inputs, select, on_demand=True)
    assert torch.equal(final, final2)
    assert list(lazy) == [3, 5] and 1 not in lazy
    assert torch.equal(lazy[3], eager[3]) and torch.equal(lazy[5], eager[5])
    assert lazy[3] is not lazy[3]  # computed at each access, never kept
    with pytest.raises(ConfigError, match=r"layers \[2\] have no verbalizer; kept: \[1, 3, 5\]"):
        VerbalizerTap(model, v, layers=(2,))
    with pytest.raises(ConfigError, match="no verbalizers"):
        VerbalizerTap(model, None, layers=(1,))
