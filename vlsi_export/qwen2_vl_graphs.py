"""ONNX-friendly wrappers of Qwen2-VL's three parts: vision encoder, token embedding, decoder.

The stock vision tower splits its attention by image with data-dependent slicing
(``cu_seqlens``), which dynamo cannot trace and the legacy exporter freezes to one image
size. Here the per-patch rotary positions and an image index per patch are computed outside
the graph (numpy, ``vision_inputs``) and passed in; attention is masked to patches of the same
image, so one graph serves any number of images of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlsi.mrope import vision_inputs  # noqa: F401  (re-exported for the exporter)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class VisionEncoder(nn.Module):
    """``pixel_values (N, C*T*P*P), positions (N, 2), image_index (N,) -> image embeds (N / m^2, D)``."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone(), persistent=False)

    def forward(self, pixel_values, positions, image_index):
        x = self.visual.patch_embed(pixel_values)  # (N, E)
        freqs = positions[..., None].float() * self.inv_freq  # (N, 2, F)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        same = image_index[:, None] == image_index[None, :]  # (N, N): attend within an image only
        n = x.shape[0]
        for blk in self.visual.blocks:
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).reshape(n, 3, self.heads, self.head_dim).unbind(1)  # (N, H, d) each
            q = q.float() * cos + _rotate_half(q.float()) * sin
            k = k.float() * cos + _rotate_half(k.float()) * sin
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None].float(), attn_mask=same[None, None])
            a = a[0].transpose(0, 1).reshape(n, -1).to(x.dtype)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp(blk.norm2(x))
        return self.visual.merger(x)


class TokenEmbedding(nn.Module):
    """``input_ids (B, L) -> inputs_embeds (B, L, D)``."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class Decoder(nn.Module):
    """The text decoder with an explicit KV cache, as ONNX Runtime GenAI splits it.

    ``inputs_embeds (B, L, D), attention_mask (B, P+L), position_ids (3, B, L), past_key_0,
    past_value_0, ... (B, kvH, P, hd)`` -> ``logits (B, V)`` for the last position, one
    ``(B, V)`` logits output per kept verbalizer layer, then ``present_key_i, present_value_i``.

    The layers are written out here rather than traced through transformers' modules, with
    the same weights and arithmetic, so that a decode step is a short graph: q/k/v and
    gate/up each one MatMul (one quantised MatMul after ``--quant``), M-RoPE cos/sin and the
    causal mask computed once for all layers, and grouped-query attention as one ``Attention``
    node (no repeated K/V). At a few milliseconds per token, node count is speed.
    """

    def __init__(self, model, verbalizers=None):
        super().__init__()
        from vlsi.adapters import get_adapter

        self.adapter = get_adapter(model)
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
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids)  # (B, L, hd), M-RoPE sections merged
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        total = attention_mask.shape[1]
        keys = torch.arange(total, device=inputs_embeds.device)
        queries = torch.arange(length, device=inputs_embeds.device) + (total - length)
        mask = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        layers = self.verbalizers.target_layers if self.verbalizers is not None else ()
        hidden, presents = {}, []
        h = inputs_embeds
        for i, layer in enumerate(self.lm.layers):
            x = layer.input_layernorm(h)
            q, k, v = self.qkv[i](x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.view(b, length, nh, hd).transpose(1, 2)
            k = k.view(b, length, kvh, hd).transpose(1, 2)
            v = v.view(b, length, kvh, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
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
