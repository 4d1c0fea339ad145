"""A small training job on the shared Trainer, run as its own process (or several, under torchrun).

Writes the per-step losses as JSON. `--crash-after K` kills the process (os._exit, no clean-up) during
optimizer step K+1, to test resuming from the last checkpoint.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sdcompiler.passes.trainer import Trainer, TrainerSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    target = torch.nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def draw(indices, generator):
        return {"x": data[indices], "noise": 0.1 * torch.randn(len(indices), 3, 8, 8, generator=generator)}

    calls = {"n": 0}

    def loss_fn(net, batch):
        calls["n"] += 1
        if args.crash_after and calls["n"] > args.crash_after * args.grad_accum:
            os._exit(3)  # an interruption: no clean-up, no final checkpoint
        x = batch["x"] + batch["noise"]
        loss = torch.nn.functional.mse_loss(net(x), target(x))
        return loss, {"mse": loss}

    settings = TrainerSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=1e-2,
        checkpoint_every=args.checkpoint_every,
        seed=0,
    )
    trainer = Trainer(
        model,
        model.parameters(),
        loss_fn,
        draw,
        len(data),
        settings,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        show_progress=False,
        cpu=True,
    )
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        Path(args.out).write_text(
            json.dumps({"losses": result.losses, "resumed_from": result.resumed_from, "world": trainer.world})
        )
    if torch.distributed.is_initialized():
        # Leave without tearing gloo down: destroy_process_group can hang when rank 0, which hosts the
        # rendezvous store, exits first, and skipping it lets the C++ runtime abort at exit. All ranks meet
        # at the barrier, so every result is written before anyone leaves.
        torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
