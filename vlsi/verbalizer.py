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

from collections.abc import Mapping
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

    attends = False
    """Position-wise: each position's output depends on that position only."""

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
    attends = False

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

    attends = True
    """Each position reads the earlier ones: decoding needs the layer's whole history."""

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
        from .archs import get_adapter

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

    @property
    def attends(self) -> bool:
        """Whether the heads attend over the sequence (``decoder_block``): decoding one token
        at a time must then keep each layer's earlier hidden states."""
        return any(block.attends for head in self.heads.values() for block in head.blocks)

    def layer_logits(self, k: int, hidden: torch.Tensor, lm_head: nn.Module, attention_mask=None, select=None):
        """Logits of target layer ``k`` from its hidden states ``(B, L, D)``: ``(B, L, V)``, or
        ``(N, V)`` at the ``select`` positions."""
        h = self.heads[str(k)](hidden, attention_mask)
        if select is not None:
            h = h[select]
        return lm_head(h)

    def forward(self, hidden: dict[int, torch.Tensor], lm_head: nn.Module, attention_mask=None, select=None,
                layers=None):
        """Per-layer logits.

        Args:
            hidden: ``{layer: (B, L, D)}`` hidden states after each target layer.
            select: optional ``(B, L)`` bool mask; only those positions get logits, which
                saves the full-vocabulary projection on prompt tokens.
            layers: the target layers to read (default: all).
        Returns:
            ``{layer: (B, L, V)}``, or ``{layer: (N, V)}`` with ``select`` (N = select.sum()).
        """
        layers = self.cfg.target_layers if layers is None else layers
        return {k: self.layer_logits(k, hidden[k], lm_head, attention_mask, select) for k in layers}


class LayerTap:
    """Context manager capturing the outputs of chosen decoder layers through forward hooks.

    Hooks only read, so the wrapped model's own outputs are unchanged bit for bit.
    """

    def __init__(self, model, layers):
        from .archs import get_adapter

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


class _FinalNormTap:
    """Captures the final norm's output, so the LM head can run on chosen positions only."""

    def __init__(self, model):
        from .archs import get_adapter

        self.norm = get_adapter(model).final_norm(model)
        self.captured: torch.Tensor | None = None

    def __enter__(self) -> "_FinalNormTap":
        def hook(_m, _inp, out):
            self.captured = out

        self._handle = self.norm.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


class _OnDemand(Mapping):
    """``{layer: logits}`` computed at each access and never kept: at most one layer's
    full-vocabulary distribution is alive at a time (the teacher's, during matching)."""

    def __init__(self, layers, compute):
        self._layers = tuple(layers)
        self._compute = compute

    def __getitem__(self, k):
        if k not in self._layers:
            raise KeyError(k)
        return self._compute(k)

    def __iter__(self):
        return iter(self._layers)

    def __len__(self):
        return len(self._layers)


class VerbalizerTap:
    """The model and its verbalizer heads in one pass, written once: run the backbone, capture
    the target layers' outputs, apply their heads, and read the backbone's shared LM head.

    * :meth:`forward` runs whole sequences (training, the teacher, tests).
    * :meth:`prefill` then :meth:`step` decode with a KV cache (``greedy_generate``, the torch
      runtime) and return next-token logits only. Position-wise heads read the newest
      position; heads that attend (``decoder_block``) see the layer's whole history, which the
      tap keeps across steps together with the attention mask, so each step's answer equals
      a full-sequence :meth:`forward` over the same tokens. One tap decodes one batch.

    ``layers`` (default: every target layer) picks the heads read; ``()`` or no
    ``verbalizers`` reads only the model's own head.
    """

    def __init__(self, model, verbalizers: Verbalizers | None = None, layers=None):
        from .archs import get_adapter

        if verbalizers is None:
            if layers:
                raise ConfigError(f"layers {list(layers)} asked for, but the model has no verbalizers")
            layers = ()
        elif layers is None:
            layers = verbalizers.target_layers
        missing = [k for k in layers if k not in verbalizers.target_layers] if verbalizers is not None else []
        if missing:
            raise ConfigError(f"layers {missing} have no verbalizer; kept: {list(verbalizers.target_layers)}")
        self.model = model
        self.verbalizers = verbalizers
        self.layers = tuple(layers)
        self.adapter = get_adapter(model)
        self.cache = None
        self._attends = verbalizers is not None and verbalizers.attends
        self._history: dict[int, torch.Tensor] = {}
        self._mask = self._pos = None

    def lm_head(self) -> nn.Module:
        return self.adapter.lm_head(self.model)

    # ------------------------------------------------------------------ whole sequences
    def forward(self, inputs: dict, select=None, on_demand: bool = False):
        """One pass over whole sequences.

        Args:
            inputs: the model's keyword arguments (no labels).
            select: optional ``(B, L)`` bool mask of the positions that get logits; the final
                head then reads the final norm's output there, so the full-vocabulary
                projection never runs on the other positions.
            on_demand: return the per-layer logits as a mapping that computes a layer's
                logits at each access and keeps none (streaming, one layer alive at a time).
        Returns:
            ``(final, {layer: logits})``: ``(B, L, V)`` each, or ``(N, V)`` with ``select``.
        """
        mask = inputs.get("attention_mask")
        if select is None:
            with LayerTap(self.model, self.layers) as hidden:
                final = self.model(**inputs).logits
        else:
            with _FinalNormTap(self.model) as norm, LayerTap(self.model, self.layers) as hidden:
                self.model(**inputs, logits_to_keep=1)
            final = self.lm_head()(norm.captured[select])
        if not self.layers:
            return final, {}
        head = self.lm_head()
        if on_demand:
            return final, _OnDemand(self.layers,
                                    lambda k: self.verbalizers.layer_logits(k, hidden[k], head, mask, select))
        return final, self.verbalizers(hidden, head, mask, select, layers=self.layers)

    # ------------------------------------------------------------------ decoding
    def prefill(self, inputs: dict):
        """Run a (left-padded) prompt batch; -> next-token ``(final (B, V), {layer: (B, V)})``."""
        self.cache, self._history = None, {}
        self._mask, self._pos = inputs["attention_mask"], inputs["position_ids"]
        return self._run(inputs)

    def step(self, tokens: torch.Tensor):
        """Feed one new token per row (``(B,)`` ids); -> the next-token logits as :meth:`prefill`.

        The new token's position is one past the largest so far (text after the prompt)."""
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        self._pos = self._pos.max(dim=-1, keepdim=True).values + 1
        return self._run({"input_ids": tokens[:, None], "attention_mask": self._mask, "position_ids": self._pos})

    def length(self) -> int:
        """How many positions (padding included) the tap holds: its prompt and the tokens fed since."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions: the KV cache, the attention mask and the attending
        heads' history are cut back to them, in place (prefix reuse; then :meth:`extend`).

        Raises NotImplementedError, leaving the tap as it was, when the cache cannot be cut
        (a sliding-window or otherwise non-croppable layer)."""
        length = self.length()
        if self.cache is None or not 0 < n <= length:
            raise ValueError(f"cannot keep {n} of the {length} positions this tap holds")
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(getattr(layer, "is_sliding", False) or not getattr(layer, "is_croppable", False)
                                 for layer in layers):
            raise NotImplementedError("this KV cache cannot be cut back")
        self.cache.crop(n - length)  # transformers: a negative count of positions to drop
        if self.cache.get_seq_length() != n:
            raise RuntimeError(f"the KV cache holds {self.cache.get_seq_length()} positions after cutting to {n}")
        self._mask = self._mask[:, :n]
        self._history = {k: h[:, :n] for k, h in self._history.items()}

    def extend(self, inputs: dict):
        """Run more prompt tokens after the positions the tap holds (the rest of a prompt whose
        beginning is already in the cache); -> the next-token logits as :meth:`prefill`.

        ``inputs`` holds the new ``input_ids`` ``(B, m)``, their ``position_ids`` (the slice of
        the whole prompt's positions, ``(..., B, m)``: M-RoPE positions depend on every image
        before) and the image arguments of exactly the images among them; no attention mask
        (the tap extends its own, the new tokens being real ones). Decoding then continues with
        :meth:`step` as after a :meth:`prefill` of the whole prompt."""
        if self.cache is None:
            raise ValueError("nothing to extend: prefill first")
        if "attention_mask" in inputs:
            raise ValueError("extend() builds the attention mask itself; pass none")
        ids = inputs["input_ids"]
        self._mask = torch.cat([self._mask, torch.ones(ids.shape, dtype=self._mask.dtype, device=self._mask.device)],
                               dim=1)
        self._pos = inputs["position_ids"]
        return self._run({**inputs, "attention_mask": self._mask})

    def resume(self, n: int, inputs: dict):
        """:meth:`truncate` to ``n`` positions, then :meth:`extend` with ``inputs``."""
        self.truncate(n)
        return self.extend(inputs)

    def _run(self, inputs: dict):
        with LayerTap(self.model, self.layers) as hidden:
            out = self.model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        per_layer = {}
        if self.layers:
            lm_head = self.lm_head()
            for k in self.layers:
                head = self.verbalizers.heads[str(k)]
                if self._attends:
                    h = hidden[k] if k not in self._history else torch.cat([self._history[k], hidden[k]], dim=1)
                    self._history[k] = h
                    per_layer[k] = lm_head(head(h, self._mask)[:, -1])
                else:
                    per_layer[k] = lm_head(head(hidden[k][:, -1:])[:, -1])
        return out.logits[:, -1], per_layer

