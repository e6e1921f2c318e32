"""Verbalizer heads: shapes, variants, and that they never change the backbone's output."""

from __future__ import annotations

import json

import pytest
import torch

from vlsi.archs import get_adapter
from vlsi.data.encode import Encoder
from vlsi.data.records import Record, Turn
from vlsi.errors import ConfigError
from vlsi.tiny import build_tiny
from vlsi.verbalizer import ARCHS, LayerTap, VerbalizerConfig, Verbalizers, VerbalizerTap, parse_target_layers

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


# ---------------------------------------------------------------- Table 4(f) at the paper's sizes
def _head_params(v, layer) -> int:
    return sum(p.numel() for p in v.heads[str(layer)].parameters())


def test_paper_sized_variants_have_the_papers_parameter_counts(setup):
    """Table 4(f)'s counts for 7 heads of a 7B student (d 3584, FFN width I 18944) are verb-FFN
    7*3d^2, FFN 7*3dI, MLP 7*d^2 and decoder 7 backbone decoder layers; the same formulas hold
    for the tiny student (d 96, I 256, 3 query heads, 1 key/value head of 32), each head
    plus its own RMSNorm (d)."""
    model, _, _ = setup
    d, inner, heads, kv, hd = 96, 256, 3, 1, 32
    sizes = get_adapter(model).text_sizes(model.config)
    assert (sizes.hidden_size, sizes.intermediate_size, sizes.num_heads, sizes.num_kv_heads, sizes.head_dim) == (
        d, inner, heads, kv, hd)
    attention = d * heads * hd + heads * hd + 2 * (d * kv * hd + kv * hd) + heads * hd * d  # q, k, v (biases), o
    layer = attention + 3 * d * inner + 2 * d  # the expanded gated FFN and two norms
    want = {"verb_ffn": 3 * d * d, "ffn": 3 * d * inner, "mlp": d * d, "decoder_block": layer}
    backbone_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert backbone_layer == layer  # the decoder head is exactly one backbone decoder layer
    targets = (1, 3, 5)
    for arch, per_block in want.items():
        for depth in (1, 2):
            v = Verbalizers.for_model(model, VerbalizerConfig(targets, arch=arch, depth=depth))
            assert _head_params(v, 3) == depth * per_block + d, (arch, depth)
            assert sum(p.numel() for p in v.parameters()) == len(targets) * (depth * per_block + d)
    block = Verbalizers.for_model(model, VerbalizerConfig((1,), arch="decoder_block")).heads["1"].blocks[0]
    assert type(block.layer) is type(model.model.language_model.layers[0])  # the backbone's own class
    assert block.layer.self_attn.config is model.config.text_config


def test_legacy_sizes_keep_the_earlier_heads(setup):
    model, _, _ = setup
    d = 96
    want = {"ffn": 3 * d * 4 * d, "mlp": 2 * (d * d + d), "decoder_block": 3 * d * d + d * d + 3 * d * d + 2 * d}
    for arch, per_block in want.items():
        v = Verbalizers.for_model(model, VerbalizerConfig((1,), arch=arch, sizes="legacy"))
        assert _head_params(v, 1) == per_block + d, arch


def test_paper_sized_heads_need_the_backbone():
    """ffn and decoder_block take sizes from the backbone; built without one they say how."""
    with pytest.raises(ConfigError, match="for_model"):
        Verbalizers(VerbalizerConfig((1,), arch="decoder_block"), 32, 4, 1e-6)
    with pytest.raises(ConfigError, match="intermediate width"):
        Verbalizers(VerbalizerConfig((1,), arch="ffn"), 32, 4, 1e-6)
    assert Verbalizers(VerbalizerConfig((1,), arch="ffn"), 32, 4, 1e-6, intermediate_size=80).heads["1"].blocks[0] \
        .up.out_features == 80
    with pytest.raises(ConfigError, match="verbalizer.sizes"):
        VerbalizerConfig((1,), sizes="huge").validate(6)


def _perturbed(v):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return v


@pytest.mark.parametrize("sizes", ["paper", "legacy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_for_every_variant(setup, tmp_path, tokenizer, arch, sizes):
    """verbalizers.safetensors plus the config in vlsi.json give back the same heads."""
    from safetensors.torch import load_file

    from vlsi.checkpoint import VERBALIZERS_FILE, load_checkpoint, save_checkpoint

    model, inputs, _ = setup
    proc = build_tiny("qwen2_vl", "student", tokenizer=tokenizer)[2]
    v = _perturbed(Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch=arch, sizes=sizes)))
    save_checkpoint(tmp_path / "c", model, tokenizer, proc, v)
    ck = load_checkpoint(tmp_path / "c")
    assert ck.verbalizers.cfg == v.cfg
    saved = load_file(str(tmp_path / "c" / VERBALIZERS_FILE))
    assert saved.keys() == v.state_dict().keys()
    with torch.no_grad():
        _, want = VerbalizerTap(model, v).forward(inputs)
        _, got = VerbalizerTap(ck.model, ck.verbalizers).forward(inputs)
    for k in (1, 3):
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("arch", ["ffn", "mlp", "decoder_block"])
def test_checkpoints_written_before_the_paper_sizes_still_load(setup, tmp_path, tokenizer, arch):
    """A vlsi.json without ``sizes`` (what vlsi wrote before) is read as the legacy heads."""
    from vlsi.checkpoint import META_FILE, load_checkpoint, save_checkpoint

    model, inputs, _ = setup
    proc = build_tiny("qwen2_vl", "student", tokenizer=tokenizer)[2]
    v = _perturbed(Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch=arch, sizes="legacy")))
    save_checkpoint(tmp_path / "old", model, tokenizer, proc, v)
    meta_path = tmp_path / "old" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["verbalizers"]["sizes"]
    meta_path.write_text(json.dumps(meta))
    ck = load_checkpoint(tmp_path / "old")
    assert ck.verbalizers.cfg.sizes == "legacy" and ck.verbalizers.cfg.arch == arch
    with torch.no_grad():
        _, want = VerbalizerTap(model, v).forward(inputs)
        _, got = VerbalizerTap(ck.model, ck.verbalizers).forward(inputs)
    torch.testing.assert_close(got[3], want[3])
    assert VerbalizerConfig.from_dict({"target_layers": [1], "arch": "verb_ffn", "depth": 1, "ffn_mult": 4}).sizes \
        == "paper"  # verb_ffn is the same in both


def test_decoder_block_heads_read_the_backbones_positions(setup):
    """The paper-sized decoder head applies the rotary (cos, sin) the backbone's layers were
    given: the tap captures them for every position, and other positions change the answer."""
    model, inputs, _ = setup
    v = _perturbed(Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch="decoder_block")))
    with torch.no_grad():
        with LayerTap(model, (3,), positions=True) as tap:
            model(**inputs)
        cos, sin = tap.positions
        assert cos.shape[-2] == inputs["input_ids"].shape[1]
        mask = inputs["attention_mask"]
        right = v.heads["3"](tap.hidden[3], mask, (cos, sin))
        flipped = v.heads["3"](tap.hidden[3], mask, (cos.flip(-2), sin.flip(-2)))
    assert not torch.allclose(right, flipped, atol=1e-4)
    with pytest.raises(ValueError, match="rotary position embeddings"):
        v.heads["3"](tap.hidden[3], mask)


@pytest.mark.parametrize("sizes", ["paper", "legacy"])
def test_onnx_export_refuses_decoder_block_heads(setup, sizes):
    """Heads that attend over the sequence are refused by the ONNX graphs, with the reason."""
    from vlsi.archs.onnx import Decoder, VerbalizerPart

    model, _, _ = setup
    v = Verbalizers.for_model(model, VerbalizerConfig((1, 3), arch="decoder_block", sizes=sizes))
    assert v.attends
    with pytest.raises(ValueError, match="decoder_block verbalizers attend over the whole sequence"):
        Decoder(model, v)
    with pytest.raises(ValueError, match="decoder_block verbalizers attend over the whole sequence"):
        VerbalizerPart(v, 1)


def test_decoder_block_heads_mask_alike_under_eager_and_sdpa(tokenizer):
    """The head builds the mask each attention implementation takes (sdpa: bool, eager:
    additive) from one padding mask: both give the same answer, padding included."""
    model = build_tiny("qwen2_vl", "student", seed=0, tokenizer=tokenizer)[0]
    v = _perturbed(Verbalizers.for_model(model, VerbalizerConfig((3,), arch="decoder_block")))
    g = torch.Generator().manual_seed(0)
    x, cos, sin = (torch.randn(2, 7, n, generator=g) for n in (96, 32, 32))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        sdpa = v.heads["3"](x, mask, (cos, sin))
        model.set_attn_implementation("eager")
        assert v.heads["3"].blocks[0].layer.self_attn.config._attn_implementation == "eager"
        eager = v.heads["3"](x, mask, (cos, sin))
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
