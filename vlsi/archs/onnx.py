"""What the ONNX target needs from every architecture, and the parts they share.

An architecture's ``onnx.py`` subclasses :class:`OnnxGraphs` and supplies its vision graph
(:meth:`OnnxGraphs.vision`). The token embedding and the text decoder with its explicit KV
cache are the same for every architecture here (all have a Qwen2 decoder), so they live in
this file. Graphs are exported in fp32; the target quantises them afterwards. Each graph's
input and output names are returned to the target, which writes them into the manifest;
runtimes read outputs by those names.

The decoder is written as graphs split at layer boundaries, no weight in two of them:
segments of consecutive layers (:class:`DecoderSegment`), each returning the hidden state
after its last layer at every position, cut after every kept verbalizer layer (and any other
layer asked for); the LM head once (:class:`LMHead`); and each verbalizer's own head as a
small graph (:class:`VerbalizerPart`) that the runtime applies to a captured hidden state only
when that layer's logits are read. Plain decoding chains the segments and the LM head.

The LM head is a graph of its own rather than one initializer shared by several graphs
(through one external-data file): ONNX Runtime's CPU kernels prepack a weight matrix into
each session's own memory, so a shared file would still be resident once per session that
multiplies by it; sharing prepacked weights across sessions (``PrepackedWeightsContainer``)
is C API only, and ``SessionOptions.add_initializer`` shares an ``OrtValue`` the caller owns,
which fits fp32 weights but not the quantised forms each quantiser writes under its own names
and layouts (MatMulNBits' packed blocks, int8 scales). One head graph is one copy on disk and
in memory at every precision, for one more session call per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 23
"""Opset 23 has RMSNormalization and Attention: about 30% fewer nodes per decode step than
opset 20's decomposed norm and softmax, which matters when a token takes a few ms."""


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def allowed_keys(attention_mask, length: int):
    """``(B, L, P+L)`` bool: which cached and new positions each of the ``length`` new queries
    may attend to (causal, and not padding)."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = torch.arange(length, device=attention_mask.device) + (total - length)
    return (keys[None, :] <= queries[:, None])[None] & attention_mask.bool()[:, None, :]


def rotary(rotary_emb, position_axes: int, inputs_embeds, position_ids):
    """``(cos, sin)``, each ``(B, 1, L, hd)``, for the new positions ``position_ids (A, B, L)``."""
    # A = 3 for M-RoPE (its sections are merged by the rotary module), 1 for 1-D RoPE,
    # which transformers' rotary module takes as (B, L)
    pos = position_ids if position_axes == 3 else position_ids[0]
    cos, sin = rotary_emb(inputs_embeds, pos)  # (B, L, hd)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def decoder_layer(layer, qkv, gate_up, heads: tuple[int, int, int], h, cos, sin, mask, past_k, past_v):
    """One decoder ``layer`` (with its fused ``qkv`` and ``gate_up`` projections) on ``h (B, L, D)``
    after its cache ``past_k, past_v (B, kvH, P, hd)``; ``heads`` is ``(query heads, KV heads,
    head dim)``. -> ``(h, present_k, present_v)``, the presents ``(B, kvH, P+L, hd)``."""
    b, length = h.shape[0], h.shape[1]
    nh, kvh, hd = heads
    x = layer.input_layernorm(h)
    q, k, v = qkv(x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
    q = q.view(b, length, nh, hd).transpose(1, 2)
    k = k.view(b, length, kvh, hd).transpose(1, 2)
    v = v.view(b, length, kvh, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != nh)
    h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, length, nh * hd))
    g, u = gate_up(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
    return h + layer.mlp.down_proj(layer.mlp.act_fn(g) * u), k, v


def decoder_layer_fused(layer, qkv, gate_up, heads: tuple[int, int, int], h, cos, sin, mask, past_k, past_v):
    """:func:`decoder_layer` with the same weights and arithmetic in ONNX's own operators, for
    ONNX Runtime: rotary as ``RotaryEmbedding`` on the packed ``(B, L, heads * hd)`` projections
    and grouped-query attention with its cache as one ``Attention`` node taking ``past`` and
    returning ``present`` (no reshapes, transposes or concatenations around it). 109 nodes for
    the quickstart student's 4 layers instead of 189; TensorRT's parser takes the written-out
    form, so :class:`Decoder` keeps that one."""
    from torch.onnx import ops

    nh, kvh, hd = heads
    x = layer.input_layernorm(h)
    q, k, v = qkv(x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
    # rotate-half RoPE repeats its frequencies over the two halves: the op takes one half
    c, s = cos[:, 0, :, : hd // 2], sin[:, 0, :, : hd // 2]
    q = ops.rotary_embedding(q, c, s, num_heads=nh)
    k = ops.rotary_embedding(k, c, s, num_heads=kvh)
    a, k, v, _ = ops.attention(q, k, v, mask, past_k, past_v, q_num_heads=nh, kv_num_heads=kvh)
    h = h + layer.self_attn.o_proj(a)
    g, u = gate_up(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
    return h + layer.mlp.down_proj(layer.mlp.act_fn(g) * u), k, v


class TokenEmbedding(nn.Module):
    """``input_ids (B, L) -> inputs_embeds (B, L, D)``."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class Decoder(nn.Module):
    """The text decoder with an explicit KV cache, as ONNX Runtime GenAI splits it, in one graph.

    The ONNX target exports it split (:class:`DecoderSegment`, :class:`LMHead`,
    :class:`VerbalizerPart`); this one-graph form is what the TensorRT target builds on
    (:class:`~vlsi.archs.tensorrt.TrtDecoder`) and what ONNX artifacts of format 2 hold.

    ``inputs_embeds (B, L, D), attention_mask (B, P+L), position_ids (A, B, L), past_key_0,
    past_value_0, ... (B, kvH, P, hd)`` -> ``logits (B, V)`` for the last position, one
    ``(B, V)`` logits output per kept verbalizer layer, then ``present_key_i, present_value_i``.

    The layers are written out here rather than traced through transformers' modules, with
    the same weights and arithmetic, so that a decode step is a short graph: q/k/v and
    gate/up each one MatMul (one quantised MatMul after ``--quant``), M-RoPE cos/sin and the
    causal mask computed once for all layers, and grouped-query attention as one ``Attention``
    node (no repeated K/V). At a few milliseconds per token, node count is speed.
    """

    def __init__(self, model, verbalizers=None, position_axes: int = 3):
        super().__init__()
        from . import get_adapter

        self.adapter = get_adapter(model)
        self.position_axes = position_axes
        self.lm = self.adapter.language_model(model)
        self.head = self.adapter.lm_head(model)
        self.verbalizers = verbalizers
        sizes = self.adapter.text_sizes(model.config)
        self.n_layers, self.n_heads, self.kv_heads, self.head_dim = (
            sizes.num_layers, sizes.num_heads, sizes.num_kv_heads, sizes.head_dim)
        if verbalizers is not None and verbalizers.cfg.arch == "decoder_block":
            raise ValueError("decoder_block verbalizers attend over the whole sequence and are not exported yet")
        self.qkv = nn.ModuleList()
        self.gate_up = nn.ModuleList()
        with torch.no_grad():
            for layer in self.lm.layers:
                at, mlp = layer.self_attn, layer.mlp
                qkv = nn.Linear(at.q_proj.in_features, 0, bias=at.q_proj.bias is not None)
                qkv.weight = nn.Parameter(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]))
                if qkv.bias is not None:
                    qkv.bias = nn.Parameter(torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]))
                gu = nn.Linear(mlp.gate_proj.in_features, 0, bias=False)
                gu.weight = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
                self.qkv.append(qkv)
                self.gate_up.append(gu)

    def rotary(self, inputs_embeds, position_ids):
        return rotary(self.lm.rotary_emb, self.position_axes, inputs_embeds, position_ids)

    def layer(self, i: int, h, cos, sin, mask, past_k, past_v):
        """Decoder layer ``i`` (0-based); see :func:`decoder_layer`."""
        heads = (self.n_heads, self.kv_heads, self.head_dim)
        return decoder_layer(self.lm.layers[i], self.qkv[i], self.gate_up[i], heads, h, cos, sin, mask, past_k, past_v)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cos, sin = self.rotary(inputs_embeds, position_ids)
        mask = allowed_keys(attention_mask, inputs_embeds.shape[1])[:, None]
        layers = self.verbalizers.target_layers if self.verbalizers is not None else ()
        hidden, presents = {}, []
        h = inputs_embeds
        for i in range(self.n_layers):
            h, k, v = self.layer(i, h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if i + 1 in layers:
                hidden[i + 1] = h[:, -1:]
        # heads on (B, 1, D), not (B, D): a 3-D input exports as MatMul, which the int4
        # quantiser (MatMulNBits) takes; a 2-D one becomes a Gemm that it leaves in fp32
        logits = self.head(self.lm.norm(h[:, -1:]))[:, 0]
        verb = [self.head(self.verbalizers.heads[str(k)](hidden[k]))[:, 0] for k in layers]
        return (logits, *verb, *presents)

    def io_names(self) -> tuple[list[str], list[str]]:
        past = [f"past_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
        layers = self.verbalizers.target_layers if self.verbalizers is not None else ()
        outs = ["logits", *[f"verbalizer_logits_{k}" for k in layers],
                *[f"present_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]]
        return ["inputs_embeds", "attention_mask", "position_ids", *past], outs


FINAL_HIDDEN = "final_hidden"
"""Output of the last decoder segment: the final norm's output, what the LM head reads."""
HEAD_INPUT, HEAD_OUTPUT = "normed_hidden", "logits"


def hidden_name(layer: int) -> str:
    """The name of the hidden state after decoder layer ``layer`` (1-based) between two segments."""
    return f"hidden_{layer}"


def past_names(first: int, last: int, kind: str = "past") -> list[str]:
    """``past_key_i, past_value_i`` (or ``present_...``) of layers ``first..last`` (1-based; names count from 0)."""
    return [f"{kind}_{what}_{i}" for i in range(first - 1, last) for what in ("key", "value")]


class DecoderSegment(nn.Module):
    """Decoder layers ``first..last`` (1-based, inclusive) of a :class:`Decoder`: one graph of the
    split decoder, sharing the decoder's fused weights (each layer's weights in one segment only).

    ``hidden_in (B, L, D), attention_mask (B, P+L), position_ids (A, B, L), past_key_i,
    past_value_i (B, kvH, P, hd)`` for its layers -> ``hidden_out (B, L, D)`` at every position
    (with ``final``, after the final norm), then ``present_key_i, present_value_i``.

    Each segment computes its own rotary cos/sin and causal mask: a handful of small nodes, so
    a step of chained segments costs what one graph did, plus a session call per segment.
    """

    def __init__(self, decoder: Decoder, first: int, last: int, final: bool):
        super().__init__()
        if not 1 <= first <= last <= decoder.n_layers:
            raise ValueError(f"layers {first}..{last} are not within 1..{decoder.n_layers}")
        self.first, self.last, self.final = first, last, final
        self.position_axes = decoder.position_axes
        self.heads = (decoder.n_heads, decoder.kv_heads, decoder.head_dim)
        self.rotary_emb = decoder.lm.rotary_emb
        self.layers = nn.ModuleList(decoder.lm.layers[first - 1:last])  # their q/k/v, gate/up are left unused
        self.qkv = nn.ModuleList(decoder.qkv[first - 1:last])
        self.gate_up = nn.ModuleList(decoder.gate_up[first - 1:last])
        self.norm = decoder.lm.norm if final else None

    def forward(self, hidden, attention_mask, position_ids, *past):
        cos, sin = rotary(self.rotary_emb, self.position_axes, hidden, position_ids)
        mask = allowed_keys(attention_mask, hidden.shape[1])[:, None]
        presents = []
        for j, layer in enumerate(self.layers):
            hidden, k, v = decoder_layer_fused(layer, self.qkv[j], self.gate_up[j], self.heads, hidden, cos, sin,
                                               mask, past[2 * j], past[2 * j + 1])
            presents += [k, v]
        if self.norm is not None:
            hidden = self.norm(hidden)
        return (hidden, *presents)

    @property
    def hidden_in(self) -> str:
        return "inputs_embeds" if self.first == 1 else hidden_name(self.first - 1)

    @property
    def hidden_out(self) -> str:
        return FINAL_HIDDEN if self.final else hidden_name(self.last)

    def io_names(self) -> tuple[list[str], list[str]]:
        return ([self.hidden_in, "attention_mask", "position_ids", *past_names(self.first, self.last)],
                [self.hidden_out, *past_names(self.first, self.last, "present")])


class LMHead(nn.Module):
    """``normed_hidden (B, T, D) -> logits (B, T, V)``: the model's LM head, once, for the final
    norm's output and for every verbalizer's. Inputs are 3-D so that the head exports as a
    MatMul, which the int4 quantiser (MatMulNBits) takes; a 2-D one would become a Gemm left in fp32."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, normed_hidden):
        return self.head(normed_hidden)


class VerbalizerPart(nn.Module):
    """``hidden_<k> (B, T, D) -> verbalizer_hidden_<k> (B, T, D)``: verbalizer ``k``'s own head
    (its FFN or MLP blocks and norm); the shared :class:`LMHead` turns the result into logits."""

    def __init__(self, verbalizers, layer: int):
        super().__init__()
        if verbalizers.attends:
            raise ValueError("decoder_block verbalizers attend over the whole sequence and are not exported yet")
        self.layer = layer
        self.head = verbalizers.heads[str(layer)]

    def forward(self, hidden):
        return self.head(hidden)

    def io_names(self) -> tuple[list[str], list[str]]:
        return [hidden_name(self.layer)], [f"verbalizer_hidden_{self.layer}"]


def segment_bounds(n_layers: int, split_layers) -> list[tuple[int, int]]:
    """``(first, last)`` of each segment (1-based, inclusive) for a decoder of ``n_layers``
    split after each of ``split_layers`` (sorted, each in 1..n_layers - 1)."""
    starts = [1, *(k + 1 for k in split_layers)]
    ends = [*split_layers, n_layers]
    return list(zip(starts, ends))


class OnnxGraphs:
    """The ONNX export of one architecture: three graphs, each with its example inputs,
    dynamic shapes and I/O names kept next to the module that is exported."""

    def vision(self, ck, model_block: dict) -> nn.Module:
        """The vision graph's module: ``(*inputs named by the spec's vision feeds) -> image_embeds``."""
        raise NotImplementedError

    def vision_example(self, ck, model_block: dict) -> dict[str, np.ndarray]:
        """Example vision inputs by name (the spec's own preprocessing of a grey image), in
        the module's argument order."""
        from PIL import Image

        from . import get_spec

        spec = get_spec(ck.adapter.name)
        image = Image.new("RGB", self.example_image_size, (122, 117, 104))
        return spec.prepare_images([image], spec.image_spec(ck.path), model_block).feeds

    example_image_size = (56, 56)
    """Width, height of the example image the vision graph is traced with."""

    def vision_dynamic_shapes(self, names: list[str]) -> dict:
        """Every vision input varies along its first axis (patches, tiles or tokens)."""
        return {n: {0: torch.export.Dim.DYNAMIC} for n in names}

    def export_vision(self, module: nn.Module, example: dict, path: Path, opset: int = OPSET) -> list[str]:
        """Export the vision ``module`` traced with ``example`` (inputs by name, numpy or torch,
        in argument order) to ``path``; returns the input names. (The TensorRT target traces
        the same module at a lower ``opset``.)"""
        names = list(example)
        args = tuple(torch.as_tensor(np.ascontiguousarray(v)) for v in example.values())
        with torch.no_grad():
            torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=["image_embeds"],
                              dynamic_shapes=self._positional(module, self.vision_dynamic_shapes(names), names),
                              dynamo=True, verbose=False, opset_version=opset)
        return names

    @staticmethod
    def _positional(module, shapes: dict, names: list[str]):
        """Dynamic shapes by input name, as torch.export wants them for ``module``: by name for a
        forward with named arguments, as one tuple for a ``forward(*args)`` wrapper."""
        import inspect

        params = list(inspect.signature(module.forward).parameters.values())
        if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
            return (tuple(shapes[n] for n in names),)
        return shapes

    def export(self, ck, verbalizers, folder: Path, model_block: dict, split_layers=()):
        """Write into ``folder`` (fp32): ``vision.onnx``, ``embed.onnx``, the decoder as segments
        ``decoder_0.onnx, ...`` split after each of ``split_layers`` and after every kept
        verbalizer layer, ``lm_head.onnx`` and one ``verbalizer_<k>.onnx`` per kept head.
        Returns ``({graph: {"inputs": [...], "outputs": [...]}}, DecoderSplit)``."""
        from vlsi.manifest import DecoderSplit, Head, Segment

        dyn = torch.export.Dim.DYNAMIC
        model = ck.model.eval()
        sizes = ck.adapter.text_sizes(model.config)
        quiet = {"dynamo": True, "verbose": False, "opset_version": OPSET}
        io = {}

        names = self.export_vision(self.vision(ck, model_block), self.vision_example(ck, model_block),
                                   folder / "vision.onnx")
        io["vision"] = {"inputs": names, "outputs": ["image_embeds"]}

        emb = TokenEmbedding(ck.adapter.embed_tokens(model)).eval()
        torch.onnx.export(emb, (torch.zeros((2, 5), dtype=torch.long),), str(folder / "embed.onnx"),
                          input_names=["input_ids"], output_names=["inputs_embeds"],
                          dynamic_shapes={"input_ids": {0: dyn, 1: dyn}}, **quiet)
        io["embed"] = {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]}

        axes = model_block["position_axes"]
        n = sizes.num_layers
        layers = tuple(verbalizers.target_layers) if verbalizers is not None else ()
        dec = Decoder(model, None, position_axes=axes).eval()
        b, length, p = 2, 5, 3
        hidden = torch.zeros(b, length, sizes.hidden_size)
        mask = torch.ones(b, p + length, dtype=torch.long)
        pos = torch.arange(p, p + length).view(1, 1, length).expand(axes, b, length).contiguous()
        segments = []
        for j, (first, last) in enumerate(segment_bounds(n, sorted({*split_layers, *layers}))):
            seg = DecoderSegment(dec, first, last, final=last == n).eval()
            past = [torch.zeros(b, sizes.num_kv_heads, p, sizes.head_dim) for _ in range(2 * (last - first + 1))]
            ins, outs = seg.io_names()
            name = f"decoder_{j}"
            torch.onnx.export(seg, (hidden, mask, pos, *past), str(folder / f"{name}.onnx"), input_names=ins,
                              output_names=outs, dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {1: dyn, 2: dyn},
                                                                 tuple({0: dyn, 2: dyn} for _ in past)), **quiet)
            io[name] = {"inputs": ins, "outputs": outs}
            segments.append(Segment(name, first, last, seg.hidden_in, seg.hidden_out))

        torch.onnx.export(LMHead(ck.adapter.lm_head(model)).eval(), (hidden,), str(folder / "lm_head.onnx"),
                          input_names=[HEAD_INPUT], output_names=[HEAD_OUTPUT],
                          dynamic_shapes={HEAD_INPUT: {0: dyn, 1: dyn}}, **quiet)
        io["lm_head"] = {"inputs": [HEAD_INPUT], "outputs": [HEAD_OUTPUT]}
        heads = []
        for k in layers:
            part = VerbalizerPart(verbalizers, k).eval()
            ins, outs = part.io_names()
            name = f"verbalizer_{k}"
            torch.onnx.export(part, (hidden,), str(folder / f"{name}.onnx"), input_names=ins, output_names=outs,
                              dynamic_shapes={"hidden": {0: dyn, 1: dyn}}, **quiet)
            io[name] = {"inputs": ins, "outputs": outs}
            heads.append(Head(name, ins[0], outs[0], layer=k))
        return io, DecoderSplit(segments, Head("lm_head", HEAD_INPUT, HEAD_OUTPUT), heads)
