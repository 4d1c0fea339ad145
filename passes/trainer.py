"""The one trainer every training pass uses (through `sdcompiler.passes.training.fit`).

Built on `accelerate`, so the same code runs on one CPU, one GPU, or many
processes (`accelerate launch`, `torchrun`; gloo on CPU, NCCL on GPU), with
mixed precision on GPU and gradient accumulation.

Determinism is by step, not by process: the global batch of step s (indices
and per-sample randomness) is drawn from a generator seeded with (seed, s) and
then split into micro-batches and across processes. So a 2-process run sees
exactly the samples of the 1-process run with the same global batch, and a
resumed run continues exactly where the interrupted one stopped.

Checkpoints (`accelerator.save_state` + `trainer_state.json`) are written every
`checkpoint_every` steps under `checkpoint_dir/step-NNNNNN`; `fit()` resumes
from the newest complete one whose settings match. Only the last two are kept.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from sdcompiler.passes.errors import PassError

# draw(indices, generator) -> dict of tensors whose first axis is the sample axis (the global batch)
DrawFn = Callable[[torch.Tensor, torch.Generator], dict]
# loss(model, batch) -> (loss, named scalar terms); called on one process's micro-batch. `model` is the
# prepared (e.g. DistributedDataParallel) model: forward through it, or gradients are not synchronised.
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class TrainerSettings:
    steps: int
    batch_size: int  # global: all processes and accumulation micro-steps together
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (GPU)
    checkpoint_every: int = 0  # 0: no checkpoints
    seed: int = 0

    def micro_batch(self, world: int) -> int:
        per_step = self.batch_size // (self.grad_accum * world)
        if per_step * self.grad_accum * world != self.batch_size or per_step == 0:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum} x processes={world}"
            )
        return per_step


@dataclass
class TrainResult:
    losses: list[float]  # mean loss per optimizer step, averaged over the global batch
    terms: list[dict[str, float]]
    resumed_from: int  # 0 when started fresh
    seconds: float
    model: torch.nn.Module | None = None  # the trained module, unwrapped (set by `training.fit`)


class Trainer:
    """Minimise `loss_fn` over `params` of `model`; the model is updated in place."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Iterable[torch.nn.Parameter],
        loss_fn: LossFn,
        draw: DrawFn,
        num_samples: int,
        settings: TrainerSettings,
        *,
        checkpoint_dir: Path | None = None,
        show_progress: bool = True,
        cpu: bool | None = None,
    ):
        from accelerate import Accelerator

        self.settings = settings
        self.loss_fn, self.draw, self.num_samples = loss_fn, draw, num_samples
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.show_progress = show_progress
        cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=settings.mixed_precision if not cpu else "no",
            gradient_accumulation_steps=settings.grad_accum,
        )
        params = list(params)  # parameters, or optimizer parameter groups (dicts with their own "lr")
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("nothing to train: no parameter requires grad")
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.params = [p for g in groups for p in g["params"]]

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def _global_batch(self, step: int) -> dict:
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + step)
        indices = torch.randint(0, self.num_samples, (self.settings.batch_size,), generator=generator)
        return self.draw(indices, generator)

    def _micro_batches(self, batch: dict):
        micro = self.settings.micro_batch(self.world)
        rank = self.accelerator.process_index
        device = self.accelerator.device
        for m in range(self.settings.grad_accum):
            start = (m * self.world + rank) * micro
            yield {k: v[start : start + micro].to(device) for k, v in batch.items()}

    def fit(self) -> TrainResult:
        import time

        from tqdm.auto import tqdm

        start_time = time.perf_counter()
        losses: list[float] = []
        terms: list[dict[str, float]] = []
        first = self._resume(losses, terms)
        self.model.train()
        bar = tqdm(
            range(first, self.settings.steps),
            initial=first,
            total=self.settings.steps,
            desc="train",
            disable=not self.show_progress or not self.accelerator.is_main_process,
        )
        for step in bar:
            step_loss, step_terms = torch.zeros((), device=self.accelerator.device), {}
            for micro in self._micro_batches(self._global_batch(step)):
                with self.accelerator.accumulate(self.model):
                    loss, parts = self.loss_fn(self.model, micro)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and self.settings.max_grad_norm:
                        self.accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach() / self.settings.grad_accum
                for name, value in parts.items():
                    step_terms[name] = step_terms.get(name, 0.0) + value.detach() / self.settings.grad_accum
            mean = self.accelerator.reduce(step_loss, reduction="mean").item()
            if not math.isfinite(mean):  # every process sees the same reduced mean, so all stop here
                raise PassError(
                    f"the training loss became {mean} at step {step + 1} of {self.settings.steps} "
                    f"(lr={self.settings.lr}): lower lr or check the data (no artifact was written)"
                )
            losses.append(mean)
            terms.append({k: self.accelerator.reduce(v, reduction="mean").item() for k, v in step_terms.items()})
            bar.set_postfix(loss=f"{mean:.4f}")
            done = step + 1
            if self.checkpoint_dir and self.settings.checkpoint_every and done % self.settings.checkpoint_every == 0:
                self._save(done, losses, terms)
        self.model.eval()
        self.accelerator.wait_for_everyone()
        return TrainResult(losses, terms, first, time.perf_counter() - start_time)

    # --- checkpoints -------------------------------------------------------------------------

    def _settings_key(self) -> dict:
        return {k: v for k, v in asdict(self.settings).items() if k != "checkpoint_every"} | {
            "num_samples": self.num_samples
        }

    def _save(self, step: int, losses: list[float], terms: list[dict]) -> None:
        folder = self.checkpoint_dir / f"step-{step:06d}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            state = {"step": step, "losses": losses, "terms": terms, "settings": self._settings_key()}
            (folder / "trainer_state.json").write_text(json.dumps(state))  # written last: marks it complete
            for old in sorted(self.checkpoint_dir.glob("step-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _resume(self, losses: list[float], terms: list[dict]) -> int:
        if not self.checkpoint_dir or not self.checkpoint_dir.exists():
            return 0
        for folder in sorted(self.checkpoint_dir.glob("step-*"), reverse=True):
            marker = folder / "trainer_state.json"
            if not marker.exists():
                continue
            state = json.loads(marker.read_text())
            if state["settings"] != self._settings_key():
                return 0  # another run's checkpoints: start fresh (they are overwritten as we go)
            self.accelerator.load_state(str(folder))
            losses.extend(state["losses"])
            terms.extend(state["terms"])
            return state["step"]
        return 0
