"""Training configuration: one frozen dataclass tree, loaded by ``vlsi.config.load_config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from vlsi.errors import ConfigError

Stage = Literal["pretrain", "verbalize", "interact", "sft"]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-5
    """Cosine schedule floor."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    betas: tuple[float, ...] = (0.9, 0.98)
    """AdamW betas."""

    def check(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr} / optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train the student's language model through LoRA adapters (merged when saving)."""
    r: int = 64
    """LoRA rank (paper: 64)."""
    alpha: int = 64
    """LoRA alpha (paper: 64)."""
    dropout: float = 0.0
    """LoRA dropout."""


@dataclass(frozen=True)
class VerbalizerSpec:
    target_layers: str = "1::2"
    """Target layers: 'start::step' (1-based, before the last layer) or '2,6,10'."""
    arch: Literal["verb_ffn", "ffn", "mlp", "decoder_block"] = "verb_ffn"
    """Head variant (paper Table 4(f)): verb_ffn (gated FFN, hidden -> hidden), ffn (gated FFN
    at the backbone's intermediate width), mlp (one hidden x hidden projection), decoder_block
    (one decoder layer of the backbone's own class)."""
    depth: int = 1
    """1 (x1) or 2 (x2) blocks per head."""
    sizes: Literal["paper", "legacy"] = "paper"
    """paper: ffn / mlp / decoder_block at the sizes of the paper's Table 4(f); legacy: the
    smaller stand-ins vlsi built before (ffn at 4 x hidden, mlp as two linears, decoder_block as
    full-width attention without rotary positions plus a verb-FFN), to compare with old runs."""
    fit: Literal["labels", "final"] = "labels"
    """verbalize stage: what the heads learn. labels: the reference answers (cross-entropy; the
    paper's verbalization step). final: the model's own final head, KL(final || head) on every
    answer token: drafter heads for self-speculative decoding, whose acceptance is agreement
    with the final head. Fit them after the last stage that changes the backbone, on answers
    the model gave itself (``vlsi data answers --model M``)."""


Freezable = Literal["lm_head", "embed_tokens", "vision_tower", "projector"]
"""Student parts ``interact.freeze`` can keep fixed (found through the architecture's adapter)."""
FREEZABLE: tuple[str, ...] = get_args(Freezable)

WINDOWED = ("multinomial", "random_in_window", "uniform_span_in_window", "bottomk_pick_in_window")
"""Matchings that draw from Algorithm 1's candidate window (search range, order preservation);
the paper's random, uniform and bottom-k variants look at every teacher target layer."""


@dataclass(frozen=True)
class InteractConfig:
    intermediate_op: Literal["kld", "ce", "l2", "none"] = "kld"
    """Loss between matched intermediate verbalizers: KL divergence, CE on the teacher's
    argmax tokens, L2 on centred logits, or none."""
    last_op: Literal["kld", "ce", "none"] = "kld"
    """Loss between the final heads."""
    matching: Literal["multinomial", "random", "uniform", "bottomk", "random_in_window",
                      "uniform_span_in_window", "bottomk_pick_in_window"] = "multinomial"
    """How a student layer picks its teacher layer(s). multinomial: Algorithm 1 (sampled from
    softmax(-d / T) inside the candidate window). The paper's Table 4(e) rows, as Appendix D
    defines them, over all tl teacher targets (no search range, no order; the two toggles below
    do not apply): random: one teacher target drawn uniformly; uniform: teacher target
    i * floor(tl / ts) for student target i (0-based); bottomk: the loss is the average of the
    k smallest divergences. The project's earlier variants, drawn inside the candidate window:
    random_in_window (uniform over the candidates), uniform_span_in_window (round(i (tl-1) /
    (ts-1)), snapped into the window), bottomk_pick_in_window (one of the k closest candidates,
    uniformly)."""
    bottom_k: int = 1
    """k of matching=bottomk (average of the k smallest) and bottomk_pick_in_window."""
    search_range: bool = True
    """Candidates stop at tl - ts + i, leaving room for the later student layers (windowed
    matchings only)."""
    order_preservation: bool = True
    """Candidates start after the previous match (windowed matchings only)."""
    adaptive_temperature: bool = True
    """T = (max d - min d) / scale + eps; off: T = 1 (multinomial only)."""
    temperature_scale: float = 2.0
    """The paper's scale in the adaptive temperature."""
    eps: float = 1e-6
    """The paper's epsilon in the adaptive temperature."""
    kl_direction: Literal["forward", "reverse"] = "forward"
    """forward: KL(teacher || student) (paper); reverse: KL(student || teacher)."""
    distill_temperature: float = 1.0
    """Softmax temperature of the distributions compared (loss scaled by T^2)."""
    intermediate_weight: float = 1.0
    """Weight of the summed intermediate terms against the last-layer term."""
    freeze: tuple[Freezable, ...] = ("lm_head", "embed_tokens")
    """Student parts kept fixed in interaction with full fine-tuning (lora.enabled=false); with
    LoRA every base weight is fixed anyway. Default lm_head and embed_tokens, as in the paper:
    its interaction trains LoRA on the LLM only, and it trains the word embeddings and the
    language head in the SFT step (section 3.3). The head is the one every verbalizer reads, so
    a trainable head lets the intermediate terms reshape the output instead of the layers.
    [] trains the whole student (the project's behaviour before issue 15); vision_tower and
    projector can be added (the paper's LoRA leaves them fixed too). With tied embeddings,
    freezing either freezes the shared tensor."""
    train_student_verbalizers: bool = False
    """Whether the student's verbalizer heads (fitted in the verbalize step) keep training in
    interaction. Default false: the paper (section 4.4) says the small model's verbalizer "is
    not re-trained but just utilized", so the intermediate terms must move the backbone; true
    is the other reading (Figure 2(b) read as "updating only the verbalizers and LoRA
    parameters", as a CVPR paper note has it), and the project's behaviour before issue 15."""
    chunk_tokens: int = 4096
    """Answer tokens per chunk when computing vocabulary distributions (memory bound)."""

    def check(self):
        if self.bottom_k < 1:
            raise ConfigError(f"interact.bottom_k={self.bottom_k} must be >= 1")
        if len(set(self.freeze)) != len(self.freeze):
            raise ConfigError(f"interact.freeze={list(self.freeze)} names a part twice")

    @property
    def windowed(self) -> bool:
        """Whether the matching draws from Algorithm 1's candidate window."""
        return self.matching in WINDOWED


@dataclass(frozen=True)
class DistConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DDP (replicated student) or FSDP2 (fully_shard)."""
    shard_teacher: bool = False
    """With fsdp: shard the frozen teacher too."""


@dataclass(frozen=True)
class TrainConfig:
    stage: Stage = "pretrain"
    """pretrain (AR SFT from a checkpoint or tiny:SIZE), verbalize, interact or sft."""
    model: str = "tiny:student"
    """Student checkpoint folder, or tiny:teacher / tiny:student / tiny:k256 to start from scratch."""
    arch: str = "qwen2_vl"
    """Architecture for tiny:* models."""
    teacher: Optional[str] = None
    """Teacher checkpoint with verbalizers (interact)."""
    data: str = ""
    """Training data file (LLaVA JSON, messages JSONL/Parquet)."""
    limit: Optional[int] = None
    """Use only the first N records of the data."""
    out: str = ""
    """Output checkpoint folder (its .state/ holds resumable training state)."""
    seed: int = 0
    """Seeds init (tiny:*), data order and the layer-matching sampler."""
    steps: int = 1000
    """Optimiser steps (before sft.fraction)."""
    batch_size: int = 32
    """Global batch per optimiser step (split over accumulation and processes)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    max_length: int = 512
    """Longest encoded sample; longer ones are an error unless skip_bad."""
    skip_bad: bool = False
    """Skip (and report) bad or too-long records instead of failing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    verbalizer: VerbalizerSpec = field(default_factory=VerbalizerSpec)
    interact: InteractConfig = field(default_factory=InteractConfig)
    sft_fraction: float = 1.0
    """sft stage: run this fraction of `steps` (paper: 0.5 or 1.0)."""
    distributed: DistConfig = field(default_factory=DistConfig)
    save_every: int = 0
    """Write a resumable state every N steps (0: only at the end)."""
    log_every: int = 10
    """Metrics line every N steps."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward to save memory."""
    threads: int = 0
    """torch CPU threads (0: leave as is)."""
    progress: bool = True
    """Show a progress bar."""

    def check(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.stage == "interact" and not self.teacher:
            raise ConfigError("stage=interact needs teacher=PATH (a checkpoint with verbalizers)")
        if not 0 < self.sft_fraction <= 1:
            raise ConfigError(f"sft_fraction={self.sft_fraction} must be in (0, 1]")
        if not self.data:
            raise ConfigError("data=PATH is required (a LLaVA JSON / messages JSONL or Parquet file)")
        if not self.out:
            raise ConfigError("out=DIR is required (the checkpoint folder to write)")
