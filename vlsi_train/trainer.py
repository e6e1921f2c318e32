"""One training loop for every stage: pretrain, verbalize, interact (VLsI Algorithm 1), sft.

Runs in one process on CPU or a GPU, or under ``torchrun`` with DDP (gloo on CPU, NCCL on
GPU) or FSDP2. Losses are sums over answer tokens divided by the global batch's answer-token
count, so N processes give the same update as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from vlsi.archs import get_adapter
from vlsi.checkpoint import save_checkpoint
from vlsi.data.encode import IGNORE_INDEX, Encoder
from vlsi.data.loaders import load_records
from vlsi.errors import ConfigError, VLsIError
from vlsi.verbalizer import VerbalizerTap

from . import plots
from .config import TrainConfig
from .data import BatchPlan
from .matching import match_layers
from .models import add_lora, check_pair, ensure_verbalizers, freeze_parts, load_student
from .state import load_state, run_dir, save_state


class StudentForward(nn.Module):
    """Model + verbalizers in one module (what DDP/FSDP wrap): logits on answer tokens only."""

    def __init__(self, model, verbalizers):
        super().__init__()
        self.model = model
        self.verbalizers = verbalizers

    def forward(self, inputs: dict, select: torch.Tensor, with_verbalizers: bool):
        """-> final ``(N, V)`` logits and ``{layer: (N, V)}`` verbalizer logits (N = select.sum())."""
        layers = self.verbalizers.target_layers if with_verbalizers else ()
        return VerbalizerTap(self.model, self.verbalizers, layers).forward(inputs, select)


def _answer_select(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is an answer token, and those targets."""
    sel = torch.zeros_like(labels, dtype=torch.bool)
    sel[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return sel, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.distributed = self.world > 1
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.main = self.rank == 0
        self.out = Path(cfg.out)
        self.run = run_dir(self.out)

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.student = load_student(cfg, self.device)
        model = self.student.model
        stage = cfg.stage
        self.teacher = None
        if stage in ("verbalize", "interact"):
            ensure_verbalizers(self.student, cfg.verbalizer)
        if stage == "interact":
            from vlsi.checkpoint import load_checkpoint

            self.teacher = load_checkpoint(cfg.teacher, device=self.device)
            check_pair(self.student, self.teacher)
            self.teacher.model.eval().requires_grad_(False)
            self.teacher.verbalizers.eval().requires_grad_(False)
        verb = self.student.verbalizers
        # what trains in each stage
        full_ft_interact = stage == "interact" and not cfg.lora.enabled
        model.requires_grad_(stage in ("pretrain", "sft") or full_ft_interact)
        if full_ft_interact:
            freeze_parts(model, cfg.interact.freeze)  # frozen, not merely unused: DDP skips them
        if verb is not None:
            verb.requires_grad_(stage == "verbalize" or (stage == "interact" and self._student_heads_in_loss
                                                         and cfg.interact.train_student_verbalizers))
        self.peft = None
        if stage == "interact" and cfg.lora.enabled:
            self.peft = add_lora(model, cfg)  # freezes the base weights, injects adapters in place
        if stage == "verbalize":
            model.eval()  # frozen backbone: no dropout
        else:
            model.train()
        if cfg.gradient_checkpointing and stage != "verbalize":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        self.module = StudentForward(model, verb)
        self.wrapped = self._wrap(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage={stage}: nothing to train (check lora.enabled, interact.freeze and "
                              "interact.train_student_verbalizers)")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.total_steps = max(1, round(cfg.steps * (cfg.sft_fraction if stage == "sft" else 1.0)))
        o = cfg.optim

        def lr_at(step):
            if step < o.warmup_steps:
                return (step + 1) / max(1, o.warmup_steps)
            t = (step - o.warmup_steps) / max(1, self.total_steps - o.warmup_steps)
            return (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))) / o.lr

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)

        records, report = load_records(cfg.data, skip_bad=cfg.skip_bad)
        if cfg.limit:
            records = records[: cfg.limit]
        if self.main and report.skipped:
            print(report.summary())
        self.records = records
        self.enc = Encoder(self.student.adapter, self.student.tokenizer, self.student.image_processor,
                           model.config, max_length=cfg.max_length)
        self.tenc = None
        if self.teacher is not None:
            self.tenc = Encoder(self.teacher.adapter, self.teacher.tokenizer, self.teacher.image_processor,
                                self.teacher.model.config, max_length=cfg.max_length)
        self.plan = BatchPlan(len(records), cfg.batch_size, cfg.grad_accum, cfg.seed, self.rank, self.world)
        self._cache: dict = {}

    def _wrap(self, module):
        if not self.distributed:
            return module
        if self.cfg.distributed.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in get_adapter(module.model).decoder_layers(module.model):
                fully_shard(layer)
            fully_shard(module)
            if self.teacher is not None and self.cfg.distributed.shard_teacher:
                for layer in get_adapter(self.teacher.model).decoder_layers(self.teacher.model):
                    fully_shard(layer)
                fully_shard(self.teacher.model)
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False)

    @property
    def _student_heads_in_loss(self) -> bool:
        """The student's heads feed a loss only in verbalize and in an interaction with a
        layer-wise term; final-layer KD (intermediate_op none) neither computes nor trains them."""
        cfg = self.cfg
        return cfg.stage == "verbalize" or (cfg.stage == "interact" and cfg.interact.intermediate_op != "none")

    # ------------------------------------------------------------------ batches
    def _encoded(self, enc, key, idx):
        k = (key, idx)
        if k not in self._cache:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[k] = enc.encode(self.records[idx])
        return self._cache[k]

    def _answer_tokens(self, idx) -> int:
        return sum(1 for x in self._encoded(self.enc, "s", idx).labels[1:] if x != IGNORE_INDEX)

    def _batch(self, enc, key, idxs):
        b = enc.collate([self._encoded(enc, key, i) for i in idxs])
        return {k: v.to(self.device) for k, v in b.items()}

    # ------------------------------------------------------------------ losses
    def _micro_loss(self, idxs, global_tokens: int):
        """Sum of per-token losses of one micro-batch over the global token count."""
        cfg, stage = self.cfg, self.cfg.stage
        batch = self._batch(self.enc, "s", idxs)
        labels = batch.pop("labels")
        sel, targets = _answer_select(labels)
        n = int(sel.sum())
        logs = {}
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and cfg.bf16)
        with amp:
            final, vl = self.wrapped(batch, sel, self._student_heads_in_loss)
            if stage in ("pretrain", "sft"):
                total = nn.functional.cross_entropy(final.float(), targets, reduction="sum")
                logs["loss"] = total.item()
            elif stage == "verbalize":
                if cfg.verbalizer.fit == "final":  # drafters: the model's own head, KL(final || head)
                    from .losses import kl_div

                    own = final.detach()
                    per_layer = {k: kl_div(v, own, "forward", reduce=False).sum() for k, v in vl.items()}
                else:
                    per_layer = {k: nn.functional.cross_entropy(v.float(), targets, reduction="sum")
                                 for k, v in vl.items()}
                total = sum(per_layer.values())
                logs.update({f"loss_l{k}": v.item() for k, v in per_layer.items()})
                logs["loss"] = total.item()
            else:
                total, logs = self._interact_loss(idxs, final, vl, n)
        scale = self.world / max(1, global_tokens)
        return total * scale, logs, n

    def _interact_loss(self, idxs, final, vl, n):
        cfg = self.cfg.interact
        tb = self._batch(self.tenc, "t", idxs)
        tlabels = tb.pop("labels")
        tsel, _ = _answer_select(tlabels)
        if int(tsel.sum()) != n:
            raise VLsIError("teacher and student encode the answers to different lengths; they must share a tokenizer")
        tv = self.teacher.verbalizers
        tlayers = tv.target_layers
        with torch.no_grad():
            t_final, t_layers = VerbalizerTap(self.teacher.model, tv).forward(tb, tsel, on_demand=True)

        def teacher_logits(j):  # streamed: one teacher layer's distribution at a time
            with torch.no_grad():
                return t_layers[tlayers[j]]

        from .losses import distill_loss

        kw = dict(direction=cfg.kl_direction, tau=cfg.distill_temperature, chunk=cfg.chunk_tokens)
        logs = {}
        total = final.new_zeros(())
        if cfg.intermediate_op != "none":
            slayers = self.student.verbalizers.target_layers
            inter, matched, _ = match_layers([vl[k] for k in slayers], teacher_logits, len(tlayers), cfg, self.gen)
            total = total + cfg.intermediate_weight * inter
            logs["loss_intermediate"] = inter.item() * n
            logs["matched"] = matched
        if cfg.last_op != "none":
            last = distill_loss(cfg.last_op, final, t_final, **kw)
            total = total + last
            logs["loss_last"] = last.item() * n
        logs["loss"] = total.item() * n
        return total * n, logs

    # ------------------------------------------------------------------ loop
    def _trainable_state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                if k in self._trainable_names}

    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._setup()
        self._trainable_names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        cfg_dict = asdict(cfg)
        state_path = self.run / "state"
        metrics_path = self.run / "metrics.jsonl"
        step0 = 0
        if self.resume:
            got = load_state(state_path, cfg_dict)
            if got is not None:
                step0, payload = got
                missing = set(self._trainable_names) - set(payload["trainable"])
                if missing:
                    raise VLsIError(f"{state_path}/state.pt lacks {sorted(missing)[:3]}: it is not this run's state")
                self.module.load_state_dict(payload["trainable"], strict=False)
                self.optimizer.load_state_dict(payload["optimizer"])
                self.scheduler.load_state_dict(payload["scheduler"])
                from .state import set_rng_state

                set_rng_state(payload["rng"], self.gen)
                if self.main:
                    print(f"resuming {cfg.stage} at step {step0} from {state_path}")
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            # metrics past the resumed step belong to the interrupted attempt
            rows = []
            if step0 and metrics_path.is_file():
                rows = [r for r in metrics_path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= step0]
            metrics_path.write_text("".join(r + "\n" for r in rows))
        bar = tqdm(total=self.total_steps, initial=step0, desc=cfg.stage, unit="step", disable=not (self.main and cfg.progress))
        t_last, tok_count = time.time(), 0
        params = [p for p in self.module.parameters() if p.requires_grad]
        for step in range(step0, self.total_steps):
            micro = self.plan.micro_batches(step)
            # answer tokens of the whole global batch, for exact token-mean losses across processes
            local = sum(self._answer_tokens(i) for mb in micro for i in mb)
            global_tokens = self._all_sum(local)
            step_logs: dict = {}
            try:
                for k, idxs in enumerate(micro):
                    sync = k == len(micro) - 1
                    ctx = self.wrapped.no_sync() if (self.distributed and not sync and hasattr(self.wrapped, "no_sync")) else contextlib.nullcontext()
                    with ctx:
                        loss, logs, _ = self._micro_loss(idxs, global_tokens)
                        loss.backward()
                    for key, v in logs.items():
                        if key == "matched":
                            step_logs.setdefault("matched", []).append(v)
                        else:
                            step_logs[key] = step_logs.get(key, 0.0) + v
            except torch.OutOfMemoryError as e:
                raise VLsIError(
                    f"out of memory at step {step}: lower batch_size or raise grad_accum (now {cfg.batch_size}/"
                    f"{cfg.grad_accum}), set gradient_checkpointing=true, lora.enabled=true, or lower max_length"
                ) from e
            if cfg.optim.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            else:
                grad_norm = 0.0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            tok_count += global_tokens
            done = step + 1
            losses = {k: self._all_sum(v) / max(1, global_tokens) for k, v in step_logs.items() if k.startswith("loss")}
            if self.main:
                bar.update(1)
                bar.set_postfix(loss=f"{losses.get('loss', 0):.4f}")
                row = {"step": done, **losses, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                if "matched" in step_logs:
                    row["matched"] = step_logs["matched"]
                if done % cfg.log_every == 0 or done == self.total_steps:
                    dt = time.time() - t_last
                    row["answer_tokens_per_s"] = tok_count / max(dt, 1e-9)
                    t_last, tok_count = time.time(), 0
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                self._save_state(state_path, done, cfg_dict)
        bar.close()
        return self._finish(metrics_path)

    def _all_sum(self, x):
        if not self.distributed:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return int(t.item()) if isinstance(x, int) else float(t.item())

    def _save_state(self, path, step, cfg_dict):
        if self.main:
            save_state(path, step, cfg_dict, self._trainable_state(), self.optimizer, self.scheduler, self.gen)
        if self.distributed:
            torch.distributed.barrier()

    def _finish(self, metrics_path: Path) -> Path:
        cfg = self.cfg
        model = self.student.model
        if self.peft is not None:
            model = self.peft.merge_and_unload()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        verb = self.student.verbalizers
        if self.distributed and cfg.distributed.strategy == "fsdp":
            # gather the shards into plain modules so rank 0 writes a normal checkpoint
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from vlsi.verbalizer import Verbalizers

            full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.main:
                plain = get_adapter(model).model_class()(model.config)
                plain.load_state_dict({k[6:]: v for k, v in full.items() if k.startswith("model.")})
                model = plain.eval()
                if verb is not None:
                    fresh = Verbalizers.for_model(plain, verb.cfg)
                    fresh.load_state_dict({k[12:]: v for k, v in full.items() if k.startswith("verbalizers.")})
                    verb = fresh
        if self.main:
            extra = {}
            if metrics_path.is_file():
                extra["training/metrics.jsonl"] = metrics_path
                png = plots.loss_curves(metrics_path, self.run / "loss.png")
                if png:
                    extra["training/loss.png"] = png
                fig5 = self._figure5(metrics_path)
                if fig5:
                    extra["training/matching.png"] = fig5
            rows = [json.loads(r) for r in metrics_path.read_text().splitlines() if r.strip()] if metrics_path.is_file() else []
            final_loss = rows[-1].get("loss") if rows else None
            parent = self.student.meta.get("provenance", {})
            provenance = {"stage": cfg.stage, "config": asdict(cfg), "steps": self.total_steps,
                          "final_loss": final_loss, "parent": {"model": cfg.model, "provenance": parent},
                          "teacher": cfg.teacher, "processes": self.world}
            model_cpu = model.to("cpu")
            verb = verb.to("cpu") if verb is not None else None
            save_checkpoint(self.out, model_cpu, self.student.tokenizer, self.student.image_processor, verb,
                            provenance=provenance, extra_files=extra)
        if self.distributed:
            torch.distributed.barrier()
        return self.out

    def _figure5(self, metrics_path: Path):
        import numpy as np

        rows = [json.loads(r) for r in metrics_path.read_text().splitlines() if r.strip()]
        matched = [m for r in rows for m in r.get("matched", [])]
        if not matched or self.teacher is None:
            return None
        tl = len(self.teacher.verbalizers.target_layers)
        ts = len(matched[0])
        tenth = max(1, len(matched) // 10)

        def counts(ms):
            c = np.zeros((ts, tl))
            for m in ms:
                for i, j in enumerate(m):
                    c[i, j] += 1
            return c

        return plots.matching_heatmaps(counts(matched[:tenth]), counts(matched[-tenth:]),
                                       self.student.verbalizers.target_layers, self.teacher.verbalizers.target_layers,
                                       self.run / "matching.png")


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run one stage and write its checkpoint to ``cfg.out``."""
    return Trainer(cfg, resume=resume).train()
