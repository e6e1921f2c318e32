"""Verbalizer heads: what an intermediate decoder layer would answer.

A verbalizer for target layer ``k`` maps the hidden state after decoder layer ``k``
(1-based) through a small head, an RMSNorm, and the backbone's own LM head (shared, frozen,
never copied), giving vocabulary logits for that layer. Heads are residual with their last
projection zero-initialised, so an untrained verbalizer equals the "logit lens" (final-norm
style norm + LM head on the raw hidden state) and training starts from a sensible reading.

Variants (the paper's Table 4 ablation):
- ``verb_ffn``: gated FFN keeping the width (gate, up, down all hidden->hidden, SiLU);
- ``ffn``: the same with an expanded inner width (``ffn_mult`` x hidden);
- ``mlp``: two linear layers with GELU, hidden->hidden->hidden;
- ``decoder_block``: a pre-norm causal self-attention block followed by a verb-FFN.
``depth`` stacks 1 (x1) or 2 (x2) of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ARCHS = ("verb_ffn", "ffn", "mlp", "decoder_block")


@dataclass(frozen=True)
class VerbalizerConfig:
    target_layers: tuple[int, ...]
    """1-based decoder layers whose outputs are verbalized (each < the number of layers)."""
    arch: str = "verb_ffn"
    """Head variant: verb_ffn | ffn | mlp | decoder_block."""
    depth: int = 1
    """Blocks per head: 1 (x1) or 2 (x2)."""
    ffn_mult: int = 4
    """Inner width multiple of the expanding ``ffn`` variant."""

    def validate(self, num_layers: int) -> "VerbalizerConfig":
        if self.arch not in ARCHS:
            raise ConfigError(f"verbalizer.arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.depth not in (1, 2):
            raise ConfigError(f"verbalizer.depth={self.depth} must be 1 or 2")
        if not self.target_layers:
            raise ConfigError("verbalizer.target_layers is empty; give e.g. '1::2' or '2,4'")
        bad = [k for k in self.target_layers if not 1 <= k < num_layers]
        if bad:
            raise ConfigError(
                f"verbalizer.target_layers {bad} out of range: targets are 1-based intermediate layers "
                f"1..{num_layers - 1} (the last layer is read by the model's own head)"
            )
        if list(self.target_layers) != sorted(set(self.target_layers)):
            raise ConfigError(f"verbalizer.target_layers {list(self.target_layers)} must be increasing and unique")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_layers"] = list(self.target_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VerbalizerConfig":
        unknown = set(d) - {"target_layers", "arch", "depth", "ffn_mult"}
        if unknown:
            raise ConfigError(f"unknown verbalizer keys {sorted(unknown)}; allowed: target_layers, arch, depth, ffn_mult")
        return cls(**{**d, "target_layers": tuple(int(k) for k in d["target_layers"])})


def parse_target_layers(spec, num_layers: int) -> tuple[int, ...]:
    """Target layers from ``"2,6,10"``, a list, or slice notation ``"start::step"`` / ``"start:stop:step"``.

    Slice notation counts 1-based layers and stops before the last layer by default: for 28
    layers ``"2::4"`` gives the paper's 2, 6, ..., 26.
    """
    if isinstance(spec, (list, tuple)):
        return tuple(int(k) for k in spec)
    s = str(spec).strip()
    if ":" in s:
        parts = (s.split(":") + ["", ""])[:3]
        try:
            start = int(parts[0]) if parts[0] else 1
            stop = int(parts[1]) if parts[1] else num_layers
            step = int(parts[2]) if parts[2] else 1
        except ValueError:
            raise ConfigError(f"target layers {spec!r}: use 'start::step' (e.g. '2::4') or a list like '2,6,10'") from None
        if step < 1:
            raise ConfigError(f"target layers {spec!r}: step must be >= 1")
        return tuple(range(start, stop, step))
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"target layers {spec!r}: use 'start::step' (e.g. '2::4') or a list like '2,6,10'") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedFFN(nn.Module):
    """``x + down(silu(gate(x)) * up(x))``; ``inner == dim`` is the paper's verb-FFN."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(dim, inner, bias=False)
        self.up = nn.Linear(dim, inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)
        nn.init.zeros_(self.down.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return x + self.delta(x)


class PlainMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention then a verb-FFN. Positions are already in the hidden
    states (the backbone applied its rotary embedding), so the block adds none."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.out.weight)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = GatedFFN(dim, dim)

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        # x: (B, L, D); attention_mask: (B, L) with 1 for real tokens, or None
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None]
        if attention_mask is not None:
            # padded queries see themselves, so no row is fully masked (which would give NaN)
            eye = torch.eye(length, dtype=torch.bool, device=x.device)[None, None]
            mask = (mask & attention_mask[:, None, None, :].bool()) | eye
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
        return x + self.ffn.delta(self.ffn_norm(x))


class VerbalizerHead(nn.Module):
    def __init__(self, cfg: VerbalizerConfig, dim: int, heads: int, eps: float):
        super().__init__()
        if cfg.arch == "verb_ffn":
            make = lambda: GatedFFN(dim, dim)  # noqa: E731
        elif cfg.arch == "ffn":
            make = lambda: GatedFFN(dim, cfg.ffn_mult * dim)  # noqa: E731
        elif cfg.arch == "mlp":
            make = lambda: PlainMLP(dim)  # noqa: E731
        else:
            make = lambda: DecoderBlock(dim, heads, eps)  # noqa: E731
        self.blocks = nn.ModuleList(make() for _ in range(cfg.depth))
        self.norm = RMSNorm(dim, eps)

    def forward(self, h: torch.Tensor, attention_mask=None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, attention_mask)
        return self.norm(h)


class Verbalizers(nn.Module):
    """One head per target layer; the LM head is passed in at call time, never owned."""

    def __init__(self, cfg: VerbalizerConfig, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleDict(
            {str(k): VerbalizerHead(cfg, hidden_size, num_heads, eps) for k in cfg.target_layers}
        )

    @classmethod
    def for_model(cls, model, cfg: VerbalizerConfig) -> "Verbalizers":
        """Heads sized for ``model``, norms initialised from its final norm."""
        from .adapters import get_adapter

        ad = get_adapter(model)
        sizes = ad.text_sizes(model.config)
        cfg.validate(sizes.num_layers)
        norm = ad.final_norm(model)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        v = cls(cfg, sizes.hidden_size, sizes.num_heads, eps)
        with torch.no_grad():
            for head in v.heads.values():
                head.norm.weight.copy_(norm.weight)
        p = next(model.parameters())
        return v.to(device=p.device, dtype=p.dtype)

    @property
    def target_layers(self) -> tuple[int, ...]:
        return self.cfg.target_layers

    def forward(self, hidden: dict[int, torch.Tensor], lm_head: nn.Module, attention_mask=None, select=None):
        """Per-layer logits.

        Args:
            hidden: ``{layer: (B, L, D)}`` hidden states after each target layer.
            select: optional ``(B, L)`` bool mask; only those positions get logits, which
                saves the full-vocabulary projection on prompt tokens.
        Returns:
            ``{layer: (B, L, V)}``, or ``{layer: (N, V)}`` with ``select`` (N = select.sum()).
        """
        out = {}
        for k in self.cfg.target_layers:
            h = self.heads[str(k)](hidden[k], attention_mask)
            if select is not None:
                h = h[select]
            out[k] = lm_head(h)
        return out


class LayerTap:
    """Context manager capturing the outputs of chosen decoder layers through forward hooks.

    Hooks only read, so the wrapped model's own outputs are unchanged bit for bit.
    """

    def __init__(self, model, layers):
        from .adapters import get_adapter

        self.layers = tuple(layers)
        self.modules = get_adapter(model).decoder_layers(model)
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> dict[int, torch.Tensor]:
        for k in self.layers:
            def hook(_m, _inp, out, k=k):
                self.captured[k] = out[0] if isinstance(out, tuple) else out
            self._handles.append(self.modules[k - 1].register_forward_hook(hook))
        return self.captured

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def forward_with_verbalizers(model, verbalizers: Verbalizers | None, select=None, **inputs):
    """Run ``model(**inputs)``; with verbalizers, also return per-target-layer logits.

    Returns ``(outputs, {layer: logits})`` (an empty dict without verbalizers).
    """
    if verbalizers is None:
        return model(**inputs), {}
    from .adapters import get_adapter

    with LayerTap(model, verbalizers.target_layers) as hidden:
        out = model(**inputs)
    lm_head = get_adapter(model).lm_head(model)
    return out, verbalizers(hidden, lm_head, inputs.get("attention_mask"), select)
