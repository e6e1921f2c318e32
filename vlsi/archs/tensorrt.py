"""What the TensorRT target needs from every architecture: graphs TensorRT's ONNX parser takes.

TensorRT builds engines on the device, from ONNX, and since 11.0 only strongly typed: the
precision must be written into the graph. So these graphs differ from the ONNX target's
(:mod:`vlsi.archs.onnx`) in what they are made of, not in what they compute:

- **stock ops only, opset 21, IR 10** — JetPack 6's TensorRT 10.3 has no ``Attention`` or
  ``RMSNormalization`` (opset 23), and no TensorRT parses ``com.microsoft`` ops;
- **fp16 typed** (the model is traced in half precision), with fp32 kept where fp16 would
  lose the answer: RMSNorm and LayerNorm statistics, the rotary products, the attention
  softmax (scores are computed from pre-scaled fp16 queries, then softmaxed in fp32);
- grouped-query attention by **broadcasting** queries ``(B, kvH, g, L, hd)`` against keys
  ``(B, kvH, 1, S, hd)``, so the K/V cache is never copied per query head;
- the rotary **cos/sin come from the host** (:mod:`vlsi.archs.rope`, numpy): M-RoPE's three
  position axes and their sections stay out of the graph, as TensorRT Edge-LLM does;
- the token embedding is **not a graph**: an fp16 table the host memory-maps and reads rows
  from (``embed.npy``);
- a KV cache per layer in (``past_*``, ``(B, kvH, P, hd)``) and out (``present_*``, with the
  new positions appended).

INT8 and INT4 are applied to these fp16 graphs afterwards (``vlsi_export.trt_quant``). The
vision graph is the architecture's own ONNX vision module traced in fp16 at opset 21, with
LayerNorms and rotary tables kept in fp32. An architecture's ``tensorrt.py`` names its ONNX
graphs class; everything else is here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx import Decoder, allowed_keys, rotate_half

OPSET = 21
"""The highest opset whose every op we use parses in TensorRT 10.3 (block-wise
``DequantizeLinear`` for INT4 needs 21)."""
IR_VERSION = 10


def rope_block(model, adapter) -> dict:
    """The rotary table the host needs (see :func:`vlsi.archs.rope.rope_tables`), read from the
    model's own rotary module: its fp32 inverse frequencies, scaling, and the position axis of
    each frequency (M-RoPE's sections; all 0 for 1-D RoPE)."""
    rot = adapter.language_model(model).rotary_emb
    inv = rot.inv_freq.detach().float().cpu().numpy()
    sections = getattr(rot, "mrope_section", None)
    if sections:
        axes = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)])
    else:
        axes = np.zeros(len(inv), np.int64)
    if len(axes) != len(inv):
        raise ValueError(f"mrope_section {sections} does not cover the {len(inv)} rotary frequencies")
    return {"inv_freq": [float(x) for x in inv], "scaling": float(getattr(rot, "attention_scaling", 1.0)),
            "axes": [int(a) for a in axes]}


class TrtDecoder(Decoder):
    """The text decoder for TensorRT: the ONNX target's :class:`~vlsi.archs.onnx.Decoder` (same
    weights, fused q/k/v and gate/up) with TensorRT's inputs and arithmetic.

    ``inputs_embeds (B, L, D) fp16, attention_mask (B, P+L) int64, rope_cos, rope_sin (B, L, hd)
    fp32, past_key_0, past_value_0, ... (B, kvH, P, hd) fp16`` -> ``logits (B, V) fp32`` for the
    last position, one ``verbalizer_logits_<k>`` per kept head, then ``present_key_i,
    present_value_i (B, kvH, P+L, hd) fp16``.
    """

    def rotate(self, x, cos, sin):
        """Rotary embedding in fp32, back to the activations' type."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def forward(self, inputs_embeds, attention_mask, rope_cos, rope_sin, *past):
        b, length = inputs_embeds.shape[0], inputs_embeds.shape[1]
        nh, kvh, hd = self.n_heads, self.kv_heads, self.head_dim
        g = nh // kvh
        cos, sin = rope_cos[:, None], rope_sin[:, None]  # (B, 1, L, hd)
        allowed = allowed_keys(attention_mask, length)  # (B, L, S)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]  # (B, 1, 1, L, S) fp32
        scale = hd ** -0.5
        layers = self.verbalizers.target_layers if self.verbalizers is not None else ()
        hidden, presents = {}, []
        h = inputs_embeds
        for i, layer in enumerate(self.lm.layers):
            x = layer.input_layernorm(h)
            q, k, v = self.qkv[i](x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = self.rotate(q.view(b, length, nh, hd).transpose(1, 2), cos, sin)
            k = self.rotate(k.view(b, length, kvh, hd).transpose(1, 2), cos, sin)
            v = v.view(b, length, kvh, hd).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            qg = (q * scale).reshape(b, kvh, g, length, hd)
            scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)).float() + bias  # (B, kvH, g, L, S)
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            a = torch.matmul(probs, v[:, :, None]).reshape(b, nh, length, hd)
            h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, length, nh * hd))
            gate, up = self.gate_up[i](layer.post_attention_layernorm(h)).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            if i + 1 in layers:
                hidden[i + 1] = h[:, -1:]
        logits = self.head(self.lm.norm(h[:, -1:]))[:, 0].float()
        verb = [self.head(self.verbalizers.heads[str(k)](hidden[k]))[:, 0].float() for k in layers]
        return (logits, *verb, *presents)

    def io_names(self) -> tuple[list[str], list[str]]:
        ins, outs = super().io_names()
        at = ins.index("position_ids")
        return [*ins[:at], "rope_cos", "rope_sin", *ins[at + 1:]], outs


class _Fp32Norm(nn.Module):
    """A LayerNorm kept in fp32 inside an fp16 graph: statistics in fp32, result cast back."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.float()).to(x.dtype)


def to_half(module: nn.Module) -> nn.Module:
    """``module`` in fp16, except LayerNorms (wrapped to run in fp32) and rotary ``inv_freq``
    buffers (kept at their fp32 values: halving them shifts every rotary angle)."""
    keep = {name: buf.detach().clone() for name, buf in module.named_buffers() if name.endswith("inv_freq")}
    norms = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.LayerNorm)]
    module.half()
    for name, m in norms:
        m.float()
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, _Fp32Norm(m))
    for name, buf in keep.items():
        parent, _, attr = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        owner._buffers[attr] = buf
    return module


class _HalfInputs(nn.Module):
    """Takes the vision graph's float inputs as the host makes them (fp32) and casts them to
    fp16 inside the graph; integer inputs pass through."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*[a.half() if a.is_floating_point() else a for a in args])


class TensorRTGraphs:
    """The TensorRT export of one architecture; subclasses name their ``onnx`` graphs class,
    whose vision module is reused."""

    onnx: type = None

    def export(self, ck, verbalizers, folder: Path, model_block: dict) -> dict[str, dict]:
        """Write ``vision.onnx``, ``decoder.onnx`` (fp16, opset 21) and ``embed.npy`` into
        ``folder``; returns ``{graph: {"inputs", "outputs"}}`` and the decoder's ``rope`` block."""
        dyn = torch.export.Dim.DYNAMIC
        adapter = ck.adapter
        rope = rope_block(ck.model, adapter)
        model = to_half(copy.deepcopy(ck.model).eval())
        verbs = to_half(copy.deepcopy(verbalizers).eval()) if verbalizers is not None else None
        sizes = adapter.text_sizes(model.config)
        io = {}

        graphs = self.onnx()
        fake = type("Ck", (), {"model": model, "adapter": adapter, "path": ck.path})()
        vision = _HalfInputs(graphs.vision(fake, model_block))
        names = graphs.export_vision(vision, graphs.vision_example(ck, model_block), folder / "vision.onnx",
                                     opset=OPSET)
        io["vision"] = {"inputs": names, "outputs": ["image_embeds"]}

        table = adapter.embed_tokens(model).weight.detach().numpy().astype(np.float16)
        np.save(folder / "embed.npy", table)
        io["embed"] = {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]}

        dec = TrtDecoder(model, verbs).eval()
        b, length, p = 2, 5, 3
        hd = sizes.head_dim
        past = [torch.zeros(b, sizes.num_kv_heads, p, hd, dtype=torch.float16) for _ in range(2 * sizes.num_layers)]
        example = (torch.zeros(b, length, sizes.hidden_size, dtype=torch.float16),
                   torch.ones(b, p + length, dtype=torch.long),
                   torch.ones(b, length, hd), torch.zeros(b, length, hd), *past)
        ins, outs = dec.io_names()
        with torch.no_grad():
            torch.onnx.export(dec, example, str(folder / "decoder.onnx"), input_names=ins, output_names=outs,
                              dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
                                              tuple({0: dyn, 2: dyn} for _ in past)),
                              dynamo=True, verbose=False, opset_version=OPSET)
        io["decoder"] = {"inputs": ins, "outputs": outs, "rope": rope}
        for name in ("vision", "decoder"):
            _set_ir(folder / f"{name}.onnx")
        return io


def _set_ir(path: Path) -> None:
    """Stamp IR version 10 (what TensorRT 10.x reads) on a graph the exporter wrote."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    if m.ir_version != IR_VERSION:
        m.ir_version = IR_VERSION
        onnx.save(m, str(path))
