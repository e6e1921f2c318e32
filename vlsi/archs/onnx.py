"""What the ONNX target needs from every architecture, and the parts they share.

An architecture's ``onnx.py`` subclasses :class:`OnnxGraphs` and supplies its vision graph
(:meth:`OnnxGraphs.vision`). The token embedding and the text decoder with its explicit KV
cache are the same for every architecture here (all have a Qwen2 decoder), so they live in
this file. Graphs are exported in fp32; the target quantises them afterwards. Each graph's
input and output names are returned to the target, which writes them into the manifest;
runtimes read outputs by those names.
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


class TokenEmbedding(nn.Module):
    """``input_ids (B, L) -> inputs_embeds (B, L, D)``."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class Decoder(nn.Module):
    """The text decoder with an explicit KV cache, as ONNX Runtime GenAI splits it.

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

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        b, length = inputs_embeds.shape[0], inputs_embeds.shape[1]
        nh, kvh, hd = self.n_heads, self.kv_heads, self.head_dim
        # A = 3 for M-RoPE (its sections are merged by the rotary module), 1 for 1-D RoPE,
        # which transformers' rotary module takes as (B, L)
        pos = position_ids if self.position_axes == 3 else position_ids[0]
        cos, sin = self.lm.rotary_emb(inputs_embeds, pos)  # (B, L, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = allowed_keys(attention_mask, length)[:, None]
        layers = self.verbalizers.target_layers if self.verbalizers is not None else ()
        hidden, presents = {}, []
        h = inputs_embeds
        for i, layer in enumerate(self.lm.layers):
            x = layer.input_layernorm(h)
            q, k, v = self.qkv[i](x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.view(b, length, nh, hd).transpose(1, 2)
            k = k.view(b, length, kvh, hd).transpose(1, 2)
            v = v.view(b, length, kvh, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kvh != nh)
            h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, length, nh * hd))
            g, u = self.gate_up[i](layer.post_attention_layernorm(h)).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(layer.mlp.act_fn(g) * u)
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

    def export(self, ck, verbalizers, folder: Path, model_block: dict) -> dict[str, dict]:
        """Write ``vision.onnx``, ``embed.onnx`` and ``decoder.onnx`` (fp32) into ``folder``;
        returns ``{graph: {"inputs": [...], "outputs": [...]}}``."""
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
        dec = Decoder(model, verbalizers, position_axes=axes).eval()
        b, length, p = 2, 5, 3
        past = [torch.zeros(b, sizes.num_kv_heads, p, sizes.head_dim) for _ in range(2 * sizes.num_layers)]
        example = (torch.zeros(b, length, sizes.hidden_size), torch.ones(b, p + length, dtype=torch.long),
                   torch.arange(p, p + length).view(1, 1, length).expand(axes, b, length).contiguous(), *past)
        ins, outs = dec.io_names()
        torch.onnx.export(dec, example, str(folder / "decoder.onnx"), input_names=ins, output_names=outs,
                          dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {1: dyn, 2: dyn},
                                          tuple({0: dyn, 2: dyn} for _ in past)), **quiet)
        io["decoder"] = {"inputs": ins, "outputs": outs}
        return io
