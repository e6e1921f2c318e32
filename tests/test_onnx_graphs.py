"""The ONNX-friendly Qwen2-VL graphs match PyTorch in ONNX Runtime: two image sizes, two
images in one call, a KV-cached decoder with verbalizer outputs and an empty past."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from vlsi.archs.onnx import Decoder  # noqa: E402
from vlsi.archs.qwen2_vl.onnx import VisionEncoder  # noqa: E402
from vlsi.archs.qwen2_vl.positions import vision_inputs  # noqa: E402

from .conftest import png_bytes  # noqa: E402

Dy = torch.export.Dim.DYNAMIC


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    from vlsi.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt)


def _images(*sizes):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = [Image.open(io.BytesIO(png_bytes(s))).convert("RGB") for s in sizes[:1]]
    out += [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for (w, h) in sizes[1:]]
    return out


@pytest.mark.slow
def test_vision_encoder_any_size_and_count(ckpt, tmp_path):
    m = ckpt.model
    enc = VisionEncoder(m.model.visual).eval()
    first = ckpt.adapter.process_images(ckpt.image_processor, _images((84, 84)))
    pos, seg = vision_inputs(first["image_grid_thw"].numpy(), 2)
    path = tmp_path / "vision.onnx"
    torch.onnx.export(enc, (first["pixel_values"], torch.from_numpy(pos), torch.from_numpy(seg)), str(path),
                      dynamo=True, input_names=["pixel_values", "positions", "image_index"],
                      output_names=["image_embeds"],
                      dynamic_shapes={"pixel_values": {0: Dy}, "positions": {0: Dy}, "image_index": {0: Dy}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    proc = ckpt.image_processor
    # the tiny processor keeps 84x84; a processor of another size gives other grids
    from vlsi.archs import get_adapter

    wide = get_adapter("qwen2_vl").tiny_image_processor(112)
    for p, imgs in [(proc, _images((84, 84))), (proc, _images((84, 84), (84, 84))), (wide, _images((112, 112), (112, 112)))]:
        o = ckpt.adapter.process_images(p, imgs)
        pos, seg = vision_inputs(o["image_grid_thw"].numpy(), 2)
        with torch.no_grad():
            ref = torch.cat(m.model.get_image_features(o["pixel_values"], o["image_grid_thw"]).pooler_output).numpy()
        got = sess.run(None, {"pixel_values": o["pixel_values"].numpy(), "positions": pos, "image_index": seg})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-5


@pytest.mark.slow
def test_decoder_with_cache_and_verbalizers(ckpt, tmp_path):
    m = ckpt.model
    dec = Decoder(m, ckpt.verbalizers).eval()
    sz = ckpt.adapter.text_sizes(m.config)
    g = torch.Generator().manual_seed(0)

    def inputs(b, length, p):
        emb = torch.randn(b, length, sz.hidden_size, generator=g)
        mask = torch.ones(b, p + length, dtype=torch.long)
        mask[0, :2] = 0  # a left-padded row
        pos = torch.arange(p, p + length).view(1, 1, length).expand(3, b, length).contiguous()
        past = [torch.randn(b, sz.num_kv_heads, p, sz.head_dim, generator=g) for _ in range(2 * sz.num_layers)]
        return emb, mask, pos, past

    emb, mask, pos, past = inputs(2, 5, 3)
    ins, outs = dec.io_names()
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(dec, (emb, mask, pos, *past), str(path), dynamo=True, input_names=ins, output_names=outs,
                      dynamic_shapes=({0: Dy, 1: Dy}, {0: Dy, 1: Dy}, {1: Dy, 2: Dy},
                                      tuple({0: Dy, 2: Dy} for _ in past)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()][:4] == ["logits", "verbalizer_logits_1", "verbalizer_logits_3",
                                                       "verbalizer_logits_5"]
    for b, length, p in [(2, 5, 3), (1, 7, 0), (3, 1, 9)]:
        emb, mask, pos, past = inputs(b, length, p)
        with torch.no_grad():
            ref = dec(emb, mask, pos, *past)
        feed = {"inputs_embeds": emb.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        feed.update({n: x.numpy() for n, x in zip(ins[3:], past)})
        got = sess.run(None, feed)
        n_logits = 1 + len(ckpt.verbalizers.target_layers)
        for a, r in zip(got[:n_logits], ref[:n_logits]):
            assert a.shape == tuple(r.shape)
            assert np.abs(a - r.numpy()).max() < 1e-4
        # cache entries of padded positions are never attended to (and implementations fill
        # them differently): compare the real positions
        keep = mask.numpy().astype(bool)
        for a, r in zip(got[n_logits:], ref[n_logits:]):
            assert a.shape == tuple(r.shape)
            for row in range(b):
                assert np.abs(a[row][:, keep[row]] - r.numpy()[row][:, keep[row]]).max() < 1e-4
