"""Verbalizer heads: what an intermediate decoder layer would answer.

A verbalizer for target layer ``k`` maps the hidden state after decoder layer ``k``
(1-based) through a small head, an RMSNorm, and the backbone's own LM head (shared, frozen,
never copied), giving vocabulary logits for that layer. Heads are residual with their last
projection zero-initialised, so an untrained verbalizer equals the "logit lens" (final-norm
style norm + LM head on the raw hidden state) and training starts from a sensible reading.

Variants (the paper's Table 4(f), at the sizes its parameter counts imply: 7 heads of a 7B
student, hidden d, FFN width I, give verb-FFN 7*3d^2, FFN 7*3dI, MLP 7*d^2, decoder 7 blocks):
- ``verb_ffn``: gated FFN keeping the width (gate, up, down all hidden->hidden, SiLU);
- ``ffn``: the same gated FFN at the backbone's own intermediate width I;
- ``mlp``: one hidden->hidden projection, ``x + gelu(W x)``;
- ``decoder_block``: a full decoder layer of the backbone, built from its own decoder-layer
  class and text config (grouped-query attention with the backbone's rotary positions, then
  its expanded FFN), its output projections zero-initialised.
``depth`` stacks 1 (x1) or 2 (x2) of them.

``sizes="legacy"`` keeps the smaller stand-ins vlsi used before, so that their checkpoints
(whose ``vlsi.json`` has no ``sizes`` key) still load: ``ffn`` at ``ffn_mult`` x hidden,
``mlp`` as two hidden x hidden linears with a GELU between, ``decoder_block`` as full-width
multi-head causal attention without rotary positions followed by a verb-FFN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ARCHS = ("verb_ffn", "ffn", "mlp", "decoder_block")
SIZES = ("paper", "legacy")


@dataclass(frozen=True)
class VerbalizerConfig:
    target_layers: tuple[int, ...]
    """1-based decoder layers whose outputs are verbalized (each < the number of layers)."""
    arch: str = "verb_ffn"
    """Head variant: verb_ffn | ffn | mlp | decoder_block."""
    depth: int = 1
    """Blocks per head: 1 (x1) or 2 (x2)."""
    ffn_mult: int = 4
    """Inner width multiple of the legacy ``ffn`` variant (``sizes="legacy"`` only)."""
    sizes: str = "paper"
    """paper: ffn, mlp and decoder_block at the sizes of the paper's Table 4(f) (see the module
    docstring); legacy: the smaller stand-ins of checkpoints written before (read as legacy
    when their config has no ``sizes`` key). verb_ffn is the same in both."""

    def validate(self, num_layers: int) -> "VerbalizerConfig":
        if self.arch not in ARCHS:
            raise ConfigError(f"verbalizer.arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.sizes not in SIZES:
            raise ConfigError(f"verbalizer.sizes={self.sizes!r} is not one of {', '.join(SIZES)}")
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
        """From ``vlsi.json``; a config without ``sizes`` was written before the paper-sized
        variants existed, so its ffn / mlp / decoder_block heads are the legacy ones."""
        allowed = {"target_layers", "arch", "depth", "ffn_mult", "sizes"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"unknown verbalizer keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
        d = {**d, "target_layers": tuple(int(k) for k in d["target_layers"])}
        if "sizes" not in d:
            d["sizes"] = "paper" if d.get("arch", "verb_ffn") == "verb_ffn" else "legacy"
        return cls(**d)


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
    """``x + down(silu(gate(x)) * up(x))``: with ``inner == dim`` the paper's verb-FFN, with
    ``inner`` the backbone's intermediate width the paper's FFN variant."""

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

    def forward(self, x: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        return x + self.delta(x)


class ProjectionMLP(nn.Module):
    """The paper's MLP head: one hidden x hidden projection, ``x + gelu(fc(x))``."""

    attends = False

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        return x + F.gelu(self.fc(x))


class TwoLinearMLP(nn.Module):
    """Legacy ``mlp``: ``x + fc2(gelu(fc1(x)))``, two hidden x hidden linears with biases."""

    attends = False

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def causal_mask(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """``(B or 1, 1, L, L)`` bool, True where a query may attend: earlier or same positions that
    are real tokens (``attention_mask (B, L)``, 1 for real). Padded queries see themselves, so no
    row is fully masked (which would give NaN)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
        mask = (mask & attention_mask[:, None, None, :].bool()) | eye
    return mask


class AttentionFFNBlock(nn.Module):
    """Legacy ``decoder_block``: pre-norm causal full-width multi-head self-attention (no rotary
    positions) then a verb-FFN."""

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

    def forward(self, x: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        # x: (B, L, D); attention_mask: (B, L) with 1 for real tokens, or None
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(attention_mask, length, x.device))
        x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
        return x + self.ffn.delta(self.ffn_norm(x))


RESIDUAL_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")
"""The projections of a backbone decoder layer that write into the residual stream (Qwen2's
names, the text decoder of every architecture here); zeroed so an untrained block is the
identity."""


class BackboneDecoderBlock(nn.Module):
    """The paper's decoder head: one decoder layer of the backbone's own class and text config
    (grouped-query attention on the backbone's rotary positions, its expanded FFN, its norms)."""

    attends = True
    """Each position reads the earlier ones: decoding needs the layer's whole history."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        names = dict(layer.named_modules())
        missing = [n for n in RESIDUAL_OUTPUTS if n not in names]
        if missing:
            raise ConfigError(f"verbalizer.arch=decoder_block: the backbone's decoder layer "
                              f"{type(layer).__name__} has no {', '.join(missing)}; use verb_ffn, ffn or mlp heads")
        for n in RESIDUAL_OUTPUTS:
            nn.init.zeros_(names[n].weight)

    def forward(self, x: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        """``x (B, L, D)``, ``attention_mask (B, L)`` (1 for real tokens) or None, and the
        ``(cos, sin)`` the backbone's decoder layers were given for these positions."""
        if position_embeddings is None:
            raise ValueError("decoder_block heads need the backbone's rotary position embeddings: "
                             "run them through VerbalizerTap")
        impl = self.layer.self_attn.config._attn_implementation
        mask = causal_mask(attention_mask, x.shape[1], x.device)
        if impl == "eager":  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
        elif impl != "sdpa":
            raise ConfigError(f"decoder_block verbalizer heads run with eager or sdpa attention, not {impl!r}; "
                              "load the model with attn_implementation='sdpa'")
        out = self.layer(x, attention_mask=mask, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class HeadSizes:
    """What the heads need to know about their backbone."""

    hidden: int
    heads: int
    """Attention heads (legacy decoder_block)."""
    eps: float
    """The final norm's epsilon."""
    intermediate: int | None = None
    """The backbone's FFN width (paper-sized ``ffn``)."""
    decoder_layer: Callable[[int], nn.Module] | None = None
    """``layer_idx -> nn.Module``: a new decoder layer of the backbone's class (paper-sized
    ``decoder_block``)."""


def _block_maker(cfg: VerbalizerConfig, sizes: HeadSizes, layer: int):
    """``() -> block`` for one head of target ``layer``."""
    d = sizes.hidden
    if cfg.arch == "verb_ffn":
        return lambda: GatedFFN(d, d)
    if cfg.sizes == "legacy":
        return {"ffn": lambda: GatedFFN(d, cfg.ffn_mult * d), "mlp": lambda: TwoLinearMLP(d),
                "decoder_block": lambda: AttentionFFNBlock(d, sizes.heads, sizes.eps)}[cfg.arch]
    if cfg.arch == "ffn":
        if sizes.intermediate is None:
            raise ConfigError("verbalizer.arch=ffn heads take the backbone's intermediate width: build them with "
                              "Verbalizers.for_model(model, cfg) or pass intermediate_size")
        return lambda: GatedFFN(d, sizes.intermediate)
    if cfg.arch == "mlp":
        return lambda: ProjectionMLP(d)
    if sizes.decoder_layer is None:
        raise ConfigError("verbalizer.arch=decoder_block heads are decoder layers of the backbone: build them with "
                          "Verbalizers.for_model(model, cfg)")
    # the layer beside the one it reads: a sliding-window or full-attention type like layer k + 1
    return lambda: BackboneDecoderBlock(sizes.decoder_layer(layer))


class VerbalizerHead(nn.Module):
    def __init__(self, cfg: VerbalizerConfig, sizes: HeadSizes, layer: int):
        super().__init__()
        make = _block_maker(cfg, sizes, layer)
        self.blocks = nn.ModuleList(make() for _ in range(cfg.depth))
        self.norm = RMSNorm(sizes.hidden, sizes.eps)

    def forward(self, h: torch.Tensor, attention_mask=None, position_embeddings=None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, attention_mask, position_embeddings)
        return self.norm(h)


class Verbalizers(nn.Module):
    """One head per target layer; the LM head is passed in at call time, never owned."""

    def __init__(self, cfg: VerbalizerConfig, hidden_size: int, num_heads: int, eps: float,
                 intermediate_size: int | None = None, decoder_layer: Callable[[int], nn.Module] | None = None):
        """``intermediate_size`` (paper-sized ``ffn``) and ``decoder_layer`` (``layer_idx ->`` a
        new backbone decoder layer, paper-sized ``decoder_block``) come from the backbone;
        :meth:`for_model` fills them in."""
        super().__init__()
        self.cfg = cfg
        sizes = HeadSizes(hidden_size, num_heads, eps, intermediate_size, decoder_layer)
        self.heads = nn.ModuleDict({str(k): VerbalizerHead(cfg, sizes, k) for k in cfg.target_layers})

    @classmethod
    def for_model(cls, model, cfg: VerbalizerConfig) -> "Verbalizers":
        """Heads sized for ``model``, norms initialised from its final norm."""
        from .archs import get_adapter

        ad = get_adapter(model)
        sizes = ad.text_sizes(model.config)
        cfg.validate(sizes.num_layers)
        norm = ad.final_norm(model)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        layer_class = type(ad.decoder_layers(model)[0])
        text_config = ad.text_config(model.config)
        v = cls(cfg, sizes.hidden_size, sizes.num_heads, eps, intermediate_size=sizes.intermediate_size,
                decoder_layer=lambda idx: layer_class(text_config, idx))
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

    def layer_logits(self, k: int, hidden: torch.Tensor, lm_head: nn.Module, attention_mask=None, select=None,
                     position_embeddings=None):
        """Logits of target layer ``k`` from its hidden states ``(B, L, D)``: ``(B, L, V)``, or
        ``(N, V)`` at the ``select`` positions. ``position_embeddings``: the backbone's rotary
        ``(cos, sin)`` for these positions (heads that attend need them)."""
        h = self.heads[str(k)](hidden, attention_mask, position_embeddings)
        if select is not None:
            h = h[select]
        return lm_head(h)

    def forward(self, hidden: dict[int, torch.Tensor], lm_head: nn.Module, attention_mask=None, select=None,
                layers=None, position_embeddings=None):
        """Per-layer logits.

        Args:
            hidden: ``{layer: (B, L, D)}`` hidden states after each target layer.
            select: optional ``(B, L)`` bool mask; only those positions get logits, which
                saves the full-vocabulary projection on prompt tokens.
            layers: the target layers to read (default: all).
            position_embeddings: the backbone's rotary ``(cos, sin)``, for heads that attend.
        Returns:
            ``{layer: (B, L, V)}``, or ``{layer: (N, V)}`` with ``select`` (N = select.sum()).
        """
        layers = self.cfg.target_layers if layers is None else layers
        return {k: self.layer_logits(k, hidden[k], lm_head, attention_mask, select, position_embeddings)
                for k in layers}


class LayerTap:
    """Context manager capturing the outputs of chosen decoder layers through forward hooks
    (``tap.hidden``: ``{layer: (B, L, D)}``) and, with ``positions=True``, the rotary
    ``(cos, sin)`` the decoder layers are given (``tap.positions``; heads that attend read it).

    Hooks only read, so the wrapped model's own outputs are unchanged bit for bit.
    """

    def __init__(self, model, layers, positions: bool = False):
        from .archs import get_adapter

        self.layers = tuple(layers)
        self.modules = get_adapter(model).decoder_layers(model)
        self.want_positions = positions and bool(self.layers)
        self.hidden: dict[int, torch.Tensor] = {}
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = []

    def __enter__(self) -> "LayerTap":
        for k in self.layers:
            def hook(_m, _inp, out, k=k):
                self.hidden[k] = out[0] if isinstance(out, tuple) else out
            self._handles.append(self.modules[k - 1].register_forward_hook(hook))
        if self.want_positions:
            def pre_hook(_m, _args, kwargs):
                self.positions = kwargs.get("position_embeddings")
            self._handles.append(self.modules[self.layers[0] - 1].register_forward_pre_hook(pre_hook, with_kwargs=True))
        return self

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
        self._positions: tuple[torch.Tensor, ...] | None = None  # rotary (cos, sin) of the history
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
            with LayerTap(self.model, self.layers, positions=self._attends) as tap:
                final = self.model(**inputs).logits
        else:
            with _FinalNormTap(self.model) as norm, LayerTap(self.model, self.layers, positions=self._attends) as tap:
                self.model(**inputs, logits_to_keep=1)
            final = self.lm_head()(norm.captured[select])
        if not self.layers:
            return final, {}
        head, hidden, pos = self.lm_head(), tap.hidden, tap.positions
        if on_demand:
            return final, _OnDemand(self.layers,
                                    lambda k: self.verbalizers.layer_logits(k, hidden[k], head, mask, select, pos))
        return final, self.verbalizers(hidden, head, mask, select, layers=self.layers, position_embeddings=pos)

    # ------------------------------------------------------------------ decoding
    def prefill(self, inputs: dict):
        """Run a (left-padded) prompt batch; -> next-token ``(final (B, V), {layer: (B, V)})``."""
        self.cache, self._history, self._positions = None, {}, None
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
        if self._positions is not None:
            self._positions = tuple(p[..., :n, :] for p in self._positions)

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
        with LayerTap(self.model, self.layers, positions=self._attends) as tap:
            out = self.model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        hidden = tap.hidden
        if self._attends and tap.positions is not None:
            new = tap.positions
            self._positions = new if self._positions is None else tuple(
                torch.cat([old, p], dim=-2) for old, p in zip(self._positions, new))
        per_layer = {}
        if self.layers:
            lm_head = self.lm_head()
            for k in self.layers:
                head = self.verbalizers.heads[str(k)]
                if self._attends:
                    h = hidden[k] if k not in self._history else torch.cat([self._history[k], hidden[k]], dim=1)
                    self._history[k] = h
                    per_layer[k] = lm_head(head(h, self._mask, self._positions)[:, -1])
                else:
                    per_layer[k] = lm_head(head(hidden[k][:, -1:])[:, -1])
        return out.logits[:, -1], per_layer

