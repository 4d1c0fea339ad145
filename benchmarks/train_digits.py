"""Train the tiny SD1.5-layout text-to-image pipeline on real handwritten digits, then judge what it draws.

    python benchmarks/train_digits.py [--seed 0] [--out compiler/data/digits-sd15] [--vae-steps N]
                                      [--text-steps N] [--unet-steps N] [--threads 1] [--eval-seeds N]
                                      [--guidance 5] [--results-dir DIR] [--no-results]

The model is `make_checkpoint(size="tiny")`'s SD1.5 layout (U-Net: 4 stages, 2 layers per block,
cross-attention in 3 down stages and the mid-block, widths [32, 32, 64, 64]; VAE: 4 stages, 8x; 2-layer
CLIP text encoder over the 514-token byte-level vocabulary) with the U-Net's sample size set to the 8x8
latent of a 64x64 image. Data: the diffusion model's 70% share of sklearn's digits (`sdcompiler.digits`:
the judge's 30% is never seen here), upscaled bilinearly from 8x8 to 64x64 RGB.

1. VAE (`AutoencoderKL`): trained as an autoencoder, MSE of the decoded posterior sample + 1e-5 x KL;
   its `scaling_factor` is then set to 1 / (std of the latent means), so scaled latents have unit variance
   as in SD.
2. Text encoder: taught the digits first (`teach_text_encoder`: a linear probe reads the digit from every
   end-of-text / padding position of the 61 captions, cross-entropy; the probe is dropped), then frozen.
   Left random, its hidden states differ between prompts (checked and recorded) but the U-Net did not learn
   to read them within the budget: it drew the same digit for every prompt (prompt accuracy 11.5%, chance).
3. U-Net: epsilon prediction under the checkpoint's own noise schedule (scaled-linear betas 0.00085..0.012,
   1000 steps), uniform timesteps, on captions naming the digit in six phrasings (`PHRASINGS`: "a handwritten
   digit seven", "the number 7", ...), 10% of captions dropped to "" for classifier-free guidance; AdamW with
   warm-up and cosine decay; an EMA of the weights is what is saved.
4. The pipeline is saved with `save_pretrained` in fp16 (half the bytes; `make_checkpoint(size="digits")`
   writes fp32 copies), reloaded in fp32, and judged: prompt accuracy over the fixed prompts
   (`eval_prompts`: each digit in the first phrasing x `--eval-seeds` seeds), the Fréchet distance to the
   held-out real digits, and the judge's own accuracy on them.

Deterministic for a seed on one machine: `torch.use_deterministic_algorithms(True)`, a fixed thread count
(`--threads`), data order and caption choices from `numpy.random.default_rng(seed)`. Results:
`<results-dir>/digits_model.{json,md}` and `digits_model.png` (the judged images at
`--guidance`: a row per digit, 10 seeds). 20 minutes on a shared 2-core CPU (other processes kept 1.5
cores busy; the stored run).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import CpuMeter, finish_results, log, new_results, peak_rss_gib, write_results  # noqa: E402

NAME = "digits_model"
PACKAGES = ("sd-compiler", "torch", "diffusers", "transformers", "scikit-learn")
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "compiler" / "data" / "digits-sd15")
    parser.add_argument("--vae-steps", type=int, default=250)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--text-steps", type=int, default=200)
    parser.add_argument("--unet-steps", type=int, default=800)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--eval-seeds", type=int, default=20, help="seeds per digit for the judged images")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-results", action="store_true", help="train and save only (e.g. to check determinism)")
    return parser.parse_args(argv)


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batches(rng, n: int, batch: int, steps: int):
    """`steps` index batches, epoch after epoch of permutations from `rng` (the same for a seed)."""
    order = []
    for _ in range(steps):
        while len(order) < batch:
            order.extend(rng.permutation(n).tolist())
        yield order[:batch]
        order = order[batch:]


def train_vae(vae, images, args, rng, torch) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2 * args.lr, weight_decay=0.0)
    losses = []
    vae.train()
    for step, index in enumerate(batches(rng, len(images), args.vae_batch, args.vae_steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, 2 * args.lr, warmup=20)
        x = images[index]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(mse.detach()))
        if step % 25 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps}: recon mse {losses[-1]:.4f}")
    vae.eval()
    return losses


def train_unet(
    unet, text_encoder, caption_ids, latents_mean, latents_std, labels, args, rng, torch, diffusers, schedule
):
    """Epsilon-prediction training of the U-Net under the (taught, then frozen) text encoder; returns the losses
    and leaves the U-Net holding its EMA weights.

    `caption_ids`: token ids of every caption, row digit * len(PHRASINGS) + phrasing, the last row "".
    """
    noise_schedule = diffusers.DDPMScheduler.from_config(schedule)
    from sdcompiler.digits import PHRASINGS

    with torch.no_grad():
        embeddings = text_encoder(caption_ids)[0]
    models = torch.nn.ModuleDict({"unet": unet})
    optimizer = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in models.state_dict().items()}
    losses = []
    n_phrasings = len(PHRASINGS)
    models.train()
    for step, index in enumerate(batches(rng, len(labels), args.unet_batch, args.unet_steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr)
        b = len(index)
        phrasing = rng.integers(0, n_phrasings, size=b)
        dropped = rng.random(b) < CAPTION_DROPOUT
        rows = [
            len(caption_ids) - 1 if d else int(labels[i]) * n_phrasings + int(p)
            for i, p, d in zip(index, phrasing, dropped)
        ]
        context = embeddings[rows]
        z = latents_mean[index] + latents_std[index] * torch.randn_like(latents_mean[index])
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (b,))
        noisy = noise_schedule.add_noise(z, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in models.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == args.unet_steps - 1:
            recent = losses[-50:]
            log(f"unet step {step}/{args.unet_steps}: eps mse {sum(recent) / len(recent):.4f} (last 50)")
    models.load_state_dict(ema)
    models.eval()
    return losses


def teach_text_encoder(text_encoder, caption_ids, n_phrasings, steps, torch) -> list[float]:
    """Make every caption's end positions name its digit: a linear probe (dropped afterwards) reads the digit
    (10 for "") from each end-of-text / padding position, where causal attention has seen the whole caption;
    cross-entropy, Adam, full batch of the 61 captions. The U-Net then reads the digit from most of the 77
    positions instead of having to find one word whose position varies by phrasing (a random encoder left
    the U-Net drawing the same digit whatever the prompt).
    """
    labels = torch.tensor([d for d in range(10) for _ in range(n_phrasings)] + [10])
    end = caption_ids == caption_ids[-1, -1]  # the padding token ("" is all padding after BOS)
    probe = torch.nn.Linear(text_encoder.config.hidden_size, 11)
    optimizer = torch.optim.Adam([*text_encoder.parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    text_encoder.train()
    for step in range(steps):
        hidden = text_encoder(caption_ids)[0]
        logits = probe(hidden[end])
        loss = torch.nn.functional.cross_entropy(logits, labels[:, None].expand_as(end)[end])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"text encoder step {step}/{steps}: probe cross-entropy {losses[-1]:.4f}")
    text_encoder.eval().requires_grad_(False)
    return losses


def caption_distances(text_encoder, caption_ids, torch) -> float:
    """The smallest distance between two captions' hidden states (flattened): 0 would mean two prompts look alike."""
    with torch.no_grad():
        flat = text_encoder(caption_ids)[0].flatten(1)
    distances = torch.cdist(flat, flat)
    return float(distances[~torch.eye(len(flat), dtype=torch.bool)].min())


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)

    import diffusers

    from sdcompiler import digits
    from sdcompiler.testing import make_checkpoint

    results = new_results(NAME, PACKAGES, seed=args.seed, settings={k: str(v) for k, v in vars(args).items()})
    meter, started = CpuMeter(), time.perf_counter()

    # the tiny SD1.5 layout at a 64x64 image / 8x8 latent; random weights from `seed`
    scratch = args.out.with_name(args.out.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    make_checkpoint(
        scratch / "init", arch="sd15", size="tiny", seed=args.seed, unet={"sample_size": 8}, vae={"sample_size": 64}
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(scratch / "init")

    split = digits.load_split()
    images = torch.from_numpy(digits.upscale(split.train_images))
    labels = split.train_labels
    log(f"{len(labels)} training digits at {tuple(images.shape[1:])}; threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    vae_losses = train_vae(pipe.vae, images, args, rng, torch)
    vae_seconds = time.perf_counter() - t0
    with torch.no_grad():
        posteriors = [pipe.vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
        latents_mean = torch.cat([p.mean for p in posteriors])
        latents_std = torch.cat([p.std for p in posteriors])
    scaling = float(1.0 / latents_mean.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    latents_mean, latents_std = latents_mean * scaling, latents_std * scaling

    phrasings = digits.PHRASINGS
    captions = [digits.caption(d, p) for d in range(10) for p in phrasings] + [""]
    caption_ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    distance_at_init = caption_distances(pipe.text_encoder, caption_ids, torch)
    log(f"caption hidden states at init: min pairwise distance {distance_at_init:.3f} over {len(captions)} captions")

    t0 = time.perf_counter()
    text_losses = teach_text_encoder(pipe.text_encoder, caption_ids, len(phrasings), args.text_steps, torch)
    text_seconds = time.perf_counter() - t0
    distance_taught = caption_distances(pipe.text_encoder, caption_ids, torch)
    log(f"caption hidden states taught: min pairwise distance {distance_taught:.3f}")

    t0 = time.perf_counter()
    unet_losses = train_unet(
        pipe.unet,
        pipe.text_encoder,
        caption_ids,
        latents_mean,
        latents_std,
        labels,
        args,
        rng,
        torch,
        diffusers,
        pipe.scheduler.config,
    )
    unet_seconds = time.perf_counter() - t0
    training = meter.stop()
    train_seconds = time.perf_counter() - started

    # save: fp16 weights, written by save_pretrained, renamed into place when complete
    pipe.to(torch.float16)
    pipe.save_pretrained(scratch / "final", safe_serialization=True)
    shutil.rmtree(args.out, ignore_errors=True)
    (scratch / "final").rename(args.out)
    shutil.rmtree(scratch)
    log(f"saved {args.out} ({sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 2**20:.2f} MiB)")
    if args.no_results:
        return 0

    # judge what the saved weights draw (reloaded in fp32, as make_checkpoint(size="digits") writes them)
    eval_meter, t0 = CpuMeter(), time.perf_counter()
    judged = diffusers.StableDiffusionPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    judged.set_progress_bar_config(disable=True)
    prompts, prompt_digits, seeds = digits.eval_prompts(args.eval_seeds)
    judge = digits.judge()
    evaluation = {}
    for guidance in sorted({1.0, args.guidance}):
        generated = digits.generate(judged, prompts, seeds, steps=args.eval_steps, guidance_scale=guidance)
        if guidance == args.guidance:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            save_grid(generated, args.eval_seeds, args.results_dir / f"{NAME}.png")
        accuracy, stderr = judge.prompt_accuracy(generated, prompt_digits)
        read = judge.classify(generated)
        per_digit = {str(d): float(np.mean(read[np.asarray(prompt_digits) == d] == d)) for d in range(10)}
        evaluation[f"guidance_{guidance:g}"] = {
            "guidance_scale": guidance,
            "prompt_accuracy": round(accuracy, 4),
            "prompt_accuracy_stderr": round(stderr, 4),
            "frechet_distance": round(judge.frechet_distance(generated), 2),
            "per_digit_accuracy": per_digit,
        }
        log(
            f"guidance {guidance:g}: prompt accuracy {accuracy:.3f} +- {stderr:.3f}, FD {judge.frechet_distance(generated):.2f}"
        )
    judge_accuracy, judge_stderr = judge.real_accuracy()
    n_eval = len(prompts)
    train_real = digits.real_as_generated(split.train_images)
    reference_fd = judge.frechet_distance(train_real[np.random.default_rng(0).permutation(len(train_real))[:n_eval]])

    results |= {
        "model": {
            "layout": "sd15 tiny (make_checkpoint size='tiny'), U-Net sample_size 8, VAE sample_size 64",
            "unet_params": sum(p.numel() for p in judged.unet.parameters()),
            "vae_params": sum(p.numel() for p in judged.vae.parameters()),
            "text_encoder_params": sum(p.numel() for p in judged.text_encoder.parameters()),
            "vae_scaling_factor": round(scaling, 5),
            "stored_mib": round(sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20, 2),
        },
        "data": {
            "diffusion_train_digits": len(labels),
            "judge_fit_digits": len(split.judge_fit_labels),
            "held_out_digits": len(split.held_out_labels),
            "resolution": digits.RESOLUTION,
            "captions": list(phrasings),
            "caption_dropout": CAPTION_DROPOUT,
            "min_caption_distance_at_init": round(distance_at_init, 4),
            "min_caption_distance_taught": round(distance_taught, 4),
        },
        "training": {
            "wall_s": round(train_seconds, 1),
            "vae_s": round(vae_seconds, 1),
            "text_encoder_s": round(text_seconds, 1),
            "text_encoder_final_probe_cross_entropy": round(text_losses[-1], 5),
            "unet_s": round(unet_seconds, 1),
            "cpu": training,
            "vae_final_recon_mse": round(float(np.mean(vae_losses[-25:])), 5),
            "unet_final_eps_mse": round(float(np.mean(unet_losses[-50:])), 5),
            "peak_rss_gib": peak_rss_gib(),
        },
        "evaluation": {
            "prompts": f"{digits.EVAL_PHRASING!r} for digits 0-9 x seeds 0..{args.eval_seeds - 1}",
            "images": n_eval,
            "scheduler": type(judged.scheduler).__name__,
            "steps": args.eval_steps,
            **evaluation,
            "judge_accuracy_on_real": round(judge_accuracy, 4),
            "judge_accuracy_stderr": round(judge_stderr, 4),
            "real_train_share_frechet_distance": round(reference_fd, 2),
            "cpu": eval_meter.stop(),
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    }
    finish_results(results)
    write_results(results, markdown(results, args.guidance), args.results_dir, NAME)
    return 0


def save_grid(images, seeds_per_digit: int, path: Path, columns: int = 10) -> None:
    """A PNG of the judged images: one row per digit 0-9, its first `columns` seeds."""
    import numpy as np
    from PIL import Image

    columns = min(columns, seeds_per_digit)
    rows = images.reshape(10, seeds_per_digit, *images.shape[1:])[:, :columns]
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray((np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)).save(path)


def markdown(results: dict, guidance: float) -> str:
    train, ev, model, data = results["training"], results["evaluation"], results["model"], results["data"]
    cfg, plain = ev[f"guidance_{guidance:g}"], ev["guidance_1"]
    pct = lambda x: f"{100 * x:.1f}%"
    lines = [
        "# Tiny SD1.5-layout text-to-image model trained on real digits",
        "",
        f"Written by `benchmarks/train_digits.py` (seed {results['seed']}) on {results['date']}; machine: "
        f"{results['machine']['cpu_model']}, {results['machine']['cpu_count']} cores, torch threads "
        f"{results['settings']['threads']}; load average at start {results['load_average']['start']}, "
        f"at end {results['load_average']['end']}; other processes used {train['cpu'].get('others_cores')} cores "
        "on average during training.",
        "",
        f"Model: U-Net {model['unet_params']:,} params, VAE {model['vae_params']:,}, text encoder "
        f"{model['text_encoder_params']:,} (taught the digits by a probe, then frozen); stored fp16, {model['stored_mib']} MiB. Data: "
        f"{data['diffusion_train_digits']} digits for the diffusion model, {data['judge_fit_digits']} for the judge, "
        f"{data['held_out_digits']} held out; {data['resolution']}x{data['resolution']} px.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| training wall time | {train['wall_s']} s (VAE {train['vae_s']} s, text encoder {train['text_encoder_s']} s, "
        f"U-Net {train['unet_s']} s) |",
        f"| final VAE reconstruction MSE (last 25 steps, [-1, 1] scale) | {train['vae_final_recon_mse']} |",
        f"| final U-Net epsilon MSE (last 50 steps) | {train['unet_final_eps_mse']} |",
        f"| prompt accuracy, guidance {guidance:g} ({ev['images']} images, {ev['steps']} {ev['scheduler']} steps) | "
        f"{pct(cfg['prompt_accuracy'])} ± {pct(cfg['prompt_accuracy_stderr'])} |",
        f"| Fréchet distance to held-out real digits, guidance {guidance:g} | {cfg['frechet_distance']} |",
        f"| prompt accuracy, no guidance (scale 1) | {pct(plain['prompt_accuracy'])} ± {pct(plain['prompt_accuracy_stderr'])} |",
        f"| Fréchet distance, no guidance | {plain['frechet_distance']} |",
        f"| Fréchet distance of {ev['images']} real training-share digits (reference) | "
        f"{ev['real_train_share_frechet_distance']} |",
        f"| judge accuracy on {data['held_out_digits']} held-out real digits | "
        f"{pct(ev['judge_accuracy_on_real'])} ± {pct(ev['judge_accuracy_stderr'])} |",
        "",
        f"![judged images: a row per digit 0-9, seeds 0-9]({NAME}.png)",
        "",
        f"Prompts: {ev['prompts']}. Per-digit accuracy at guidance {guidance:g}: "
        + ", ".join(f"{d}: {pct(a)}" for d, a in cfg["per_digit_accuracy"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
