"""Every preset on the digits model, judged by what it draws: prompt accuracy, Fréchet distance and fidelity to
the uncompressed model, next to the U-Net MACs each image costs.

    python benchmarks/bench_quality_digits.py [--seeds 20] [--only NAME,...] [--threads 1]
                                              [--results-dir benchmarks/results] [--no-results]

The model is `make_checkpoint(size="digits")` (a tiny SD1.5 layout trained on real handwritten digits by
benchmarks/train_digits.py); the judge is `sdcompiler.digits` (a classifier trained on real digits the diffusion
model never saw). Per variant (a recipe on a target): compile it, draw the fixed evaluation set
(`digits.eval_prompts(--seeds)`: 'a handwritten digit {word}' for each digit x seeds 0..N-1, each image from
its own seeded generator) at 20 steps and guidance 5 unless the artifact's own defaults say otherwise (cfg-distill,
lcm, lcm-scheduler run their artifact's recorded defaults, guidance 1: 50, 4 and 4 steps), and report:

- prompt accuracy: share of images the judge reads as the prompt's digit, ± its standard error;
- Fréchet distance to the held-out real digits in the judge's feature space (lower is better; 200 real
  training-share digits score 13.6, the uncompressed model 34.9 at guidance 5: `digits_model.md`);
- PSNR / SSIM of each image against the uncompressed model's image for the same prompt and seed (how close the
  compressed model stays to its teacher; a recipe can keep accuracy while drawing other digits' shapes);
- U-Net MACs per image: counted while drawing (the rows of every U-Net call x that call's MACs at 64x64: the
  CFG batch counts twice, a DeepCache shallow step its shallow MACs), and the U-Net's parameters.

Training passes (distill, cfg-distill, lcm) learn from the model's own samples on the digit captions
(`digits.PHRASINGS`, 60 captions), and the calibrating passes (ptq, quest) calibrate on them: the model is
asked about digits only. Budgets are in `VARIANTS` below and recorded per row. Fake-quantized (QuEST) rows
run their int4/int8 arithmetic simulated in fp32 torch; the int8 / fp8 torch rows run real low-precision
GEMMs (`torch._int_mm` / `torch._scaled_mm`, convs by im2col on CPU); int8 onnx runs ONNX Runtime's QDQ kernels.

Results: `<results-dir>/quality_digits.{json,md}` and `quality_digits.png` (a row per variant, digits 0-9 at
seed 0). Deterministic for a machine and thread count (fixed seeds everywhere; the compiles use seed 0).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    CpuMeter,
    finish_results,
    import_checkout,
    log,
    new_results,
    peak_rss_gib,
    write_results,
)

NAME = "quality_digits"
PACKAGES = ("sd-compiler", "torch", "diffusers", "onnxruntime", "nvidia-modelopt", "scikit-learn")
STEPS, GUIDANCE = 20, 5.0

# the training and calibration budgets on the digits model (2.4M-param U-Net at 64x64; the demo's distill)
DISTILL = {"pass": "distill", "steps": 100, "num_prompts": 18, "held_out_prompts": 2, "teacher_steps": 20}
CALIB = {"calib_prompts": 8, "held_out_prompts": 2, "calib_steps": STEPS, "guidance_scale": GUIDANCE}
CFG = {"pass": "distill_cfg", "guidance_scale": GUIDANCE, "steps": 200, "num_prompts": 18, "held_out_prompts": 2}
CFG |= {"teacher_steps": STEPS, "image_steps": STEPS}
LCM = {"pass": "distill_steps", "steps": 200, "num_prompts": 18, "held_out_prompts": 2, "teacher_steps": STEPS}


def _with(preset: str, **config) -> dict:
    """The preset's single pass with `config` on top (a recipe step naming the pass)."""
    import yaml

    from sdcompiler import recipe as recipe_module

    text = (Path(recipe_module.__file__).parent / "presets" / f"{preset}.yaml").read_text()
    (step,) = yaml.safe_load(text)["passes"]
    return {**step, **config}


def variants(prompts_file: str) -> list[dict]:
    """(name, recipe, target, call, group, note) per row; `call` None: the artifact's own defaults."""
    trained = {"prompts_file": prompts_file}
    distill = dict(DISTILL, **trained)
    rows = [
        ("none", ["none"], "torch", "reference", "the uncompressed model (torch eager)"),
        ("none (onnx)", ["none"], "onnx", "export", "ONNX Runtime fp32"),
        ("fuse-qkv", ["fuse-qkv"], "torch", "export", "q/k/v in one GEMM"),
    ]
    for size in ("base", "small", "tiny"):
        for cond in ("", "-condconv"):
            name = f"bk-{size}{cond}"
            rows.append((name, [name], "torch", "prune", "block removal, no recovery"))
            rows.append((f"{name} + distill", [name, distill], "torch", "prune", "recovery distillation (100 steps)"))
    quest = dict(CALIB, **trained)
    rows += [
        ("quest-w8a8", [_with("quest-w8a8", **quest)], "torch", "quant", "fake-quant W8A8, finetuned"),
        ("quest-w4a8", [_with("quest-w4a8", **quest)], "torch", "quant", "fake-quant W4A8, finetuned"),
        ("quest-w4a4", [_with("quest-w4a4", **quest)], "torch", "quant", "fake-quant W4A4, finetuned"),
        (
            "quest-w4a4, no finetune",
            [_with("quest-w4a4", finetune=False, **quest)],
            "torch",
            "quant",
            "fake-quant W4A4, calibration only",
        ),
        ("int8 (onnx)", [_with("int8", **CALIB, **trained)], "onnx", "quant", "ORT QDQ U8/S8"),
        ("int8 (torch)", [_with("int8", **CALIB, **trained)], "torch", "quant", "modelopt INT8 + SmoothQuant"),
        ("fp8 (torch)", [_with("fp8", **CALIB, **trained)], "torch", "quant", "modelopt FP8 E4M3"),
        ("cfg-distill", [dict(CFG, **trained)], "torch", "steps", "w = 5 merged: 1 call per step"),
        (
            "cfg-distill, range",
            [dict(CFG, guidance_range=[2.0, 8.0], **trained)],
            "torch",
            "steps",
            "w in [2, 8] embedded, run at 5",
        ),
        ("lcm", [dict(LCM, **trained)], "torch", "steps", "LCM-LoRA distilled, 4 steps"),
        ("lcm-scheduler", ["lcm-scheduler"], "torch", "steps", "LCMScheduler on the base model, 4 steps"),
        ("deepcache", ["deepcache"], "torch", "cache", "full U-Net every 3rd step"),
        ("gri", ["gri"], "torch", "attention", "GRI attention, no training"),
        ("gri + distill", ["gri", distill], "torch", "attention", "GRI + recovery distillation"),
    ]
    out = []
    for name, recipe, target, group, note in rows:
        own_defaults = name.startswith(("cfg-distill", "lcm")) and "range" not in name
        out.append(
            {
                "name": name,
                "recipe": recipe,
                "target": target,
                "group": group,
                "note": note,
                "call": None if own_defaults else {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE},
            }
        )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per digit (images = 10 x seeds)")
    parser.add_argument("--only", help="comma-separated variant names (default: all; 'none' always runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--work-dir", type=Path, help="artifacts and caches (default: a temporary folder)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-results", action="store_true", help="print the table only")
    parser.add_argument("--rewrite", type=Path, help="only write the Markdown again from this stored JSON")
    return parser.parse_args(argv)


class MacCounter:
    """Counts the U-Net rows each image costs while a compiled pipeline draws: wraps the components' U-Net
    callable (and a feature cache's full / shallow calls), adding batch rows x MACs per row."""

    def __init__(self, pipe, macs_full: int, macs_shallow: int | None):
        self.macs = 0
        c = pipe.components
        c.unet = self._wrap(c.unet, macs_full)
        if c.feature_cache is not None:
            cache = c.feature_cache
            cache.full = self._wrap(cache.full, macs_full)
            cache.shallow = self._wrap(cache.shallow, macs_shallow)

    def _wrap(self, fn, macs: int):
        def counted(sample, *args, **kwargs):
            self.macs += int(sample.shape[0]) * macs
            return fn(sample, *args, **kwargs)

        return counted


def unet_macs(pipe, source: tuple[int, int]) -> tuple[int, int | None, int]:
    """(MACs per full batch-1 call at 64x64, per shallow DeepCache call or None, U-Net params); `source`: the
    checkpoint's (MACs, params), for artifacts without passes."""
    passes = pipe.manifest["passes"]
    shallow = next((p["metrics"].get("unet_macs_shallow") for p in passes if p["name"] == "feature_cache"), None)
    if passes:
        return passes[-1]["macs_after"], shallow, passes[-1]["params_after"]
    return source[0], shallow, source[1]


def source_macs(checkpoint: Path) -> tuple[int, int]:
    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import count_macs, count_params

    pipe = load_checkpoint(checkpoint).pipeline
    return count_macs(pipe.unet, (64, 64), pipe.vae_scale_factor), count_params(pipe.unet)


def draw(pipe, prompts, seeds, call, batch: int = 50):
    import numpy as np
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        part = slice(start, start + batch)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[part]]
        kwargs = dict(call or {}, height=64, width=64, output_type="np", generator=generators)
        images.append(np.asarray(pipe(list(prompts[part]), **kwargs).images, np.float32))
    return np.concatenate(images)


def run_variant(variant: dict, checkpoint: Path, work: Path, prompts, digits_of, seeds, reference, source):
    import numpy as np

    from sdcompiler import compile_pipeline, digits, load_compiled
    from sdcompiler.bench import ssim
    from sdcompiler.passes.teacher_data import psnr_db

    out = work / "artifacts" / variant["name"].replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    compile_pipeline(checkpoint, variant["recipe"], variant["target"], out, seed=0, show_progress=False)
    compile_s = time.perf_counter() - start
    pipe = load_compiled(out, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    full, shallow, params = unet_macs(pipe, source)
    counter = MacCounter(pipe, full, shallow)
    start = time.perf_counter()
    images = draw(pipe, prompts, seeds, variant["call"])
    draw_s = time.perf_counter() - start
    accuracy, se = digits.prompt_accuracy(images, digits_of)
    row = {
        "name": variant["name"],
        "group": variant["group"],
        "note": variant["note"],
        "target": variant["target"],
        "recipe": [r if isinstance(r, str) else dict(r) for r in variant["recipe"]],
        "passes": [p["name"] for p in pipe.manifest["passes"]],
        "call": variant["call"] or {"artifact defaults": pipe.manifest.get("defaults", {})},
        "prompt_accuracy": accuracy,
        "prompt_accuracy_se": se,
        "frechet": digits.frechet_distance(images),
        "unet_params": params,
        "unet_macs_per_call": full,
        "unet_macs_per_image": counter.macs / len(prompts),
        "compile_s": round(compile_s, 2),
        "draw_s_per_image": round(draw_s / len(prompts), 4),
        "pass_metrics": {p["name"]: p["metrics"] for p in pipe.manifest["passes"]},
    }
    if reference is not None:
        row["psnr_db"] = float(np.mean([psnr_db(r, i) for r, i in zip(reference, images)]))  # mean per image
        row["ssim"] = ssim(reference, images)
    shutil.rmtree(out, ignore_errors=True)
    return row, images


def table(rows: list[dict], reference: dict) -> str:
    head = (
        "| variant | target | prompt accuracy | Fréchet distance | PSNR vs none (dB) | SSIM vs none | U-Net MACs / image "
        "| vs none | U-Net params | compile (s) | verdict |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        ratio = r["unet_macs_per_image"] / reference["unet_macs_per_image"]
        psnr = "-" if "psnr_db" not in r or r["name"] == "none" else f"{r['psnr_db']:.1f}"
        psnr = "identical" if r.get("psnr_db", 0) >= 150 else psnr  # psnr_db's floor on the MSE: 200 dB
        ssim_text = f"{r['ssim']:.3f}" if "ssim" in r and r["name"] != "none" else "-"
        lines.append(
            f"| {r['name']} | {r['target']} | {100 * r['prompt_accuracy']:.1f}% ± {100 * r['prompt_accuracy_se']:.1f} "
            f"| {r['frechet']:.1f} | {psnr} | {ssim_text} | {r['unet_macs_per_image'] / 1e9:.2f} G | {ratio:.2f}x "
            f"| {r['unet_params'] / 1e6:.2f}M | {r['compile_s']:.0f} | {verdict(r, reference)} |"
        )
    return "\n".join(lines)


def verdict(row: dict, reference: dict) -> str:
    """Plain words from the numbers: accuracy lost by more than two standard errors, Fréchet distance up 25%."""
    if row["name"] == "none":
        return "reference"
    se = (row["prompt_accuracy_se"] ** 2 + reference["prompt_accuracy_se"] ** 2) ** 0.5
    drop = reference["prompt_accuracy"] - row["prompt_accuracy"]
    words = []
    if drop > max(2 * se, 0.005):
        words.append(f"loses {100 * drop:.0f} points of accuracy")
    if row["frechet"] > 1.25 * reference["frechet"]:
        words.append(f"Fréchet distance {row['frechet'] / reference['frechet']:.1f}x")
    return "; ".join(words) or "keeps quality"


def save_grid(rows_images: list, names: list[str], path: Path, seeds_per_digit: int) -> None:
    """A row per variant: digits 0-9 at seed 0 (the first image of each digit), labelled on the left."""
    import numpy as np
    from PIL import Image, ImageDraw

    label_w, gap = 150, 2
    first = [np.stack([imgs[d * seeds_per_digit] for d in range(10)]) for imgs in rows_images]
    h, w = first[0].shape[1], first[0].shape[2]
    grid = Image.new("RGB", (label_w + 10 * (w + gap), len(first) * (h + gap)), "white")
    pen = ImageDraw.Draw(grid)
    for i, (row, name) in enumerate(zip(first, names)):
        y = i * (h + gap)
        pen.text((4, y + h // 2 - 6), name, fill="black")
        for j, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))
            grid.paste(tile, (label_w + j * (w + gap), y))
    grid.convert("L").save(path, optimize=True)  # the digits are gray: a third of the bytes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rewrite:
        rewrite(args.rewrite)
        return 0
    import_checkout(with_passes=True)
    import os

    os.environ["SDCOMPILER_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from sdcompiler import digits
    from sdcompiler.testing import make_checkpoint

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="quality-digits-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SDCOMPILER_CACHE_DIR", str(work / "cache"))
    checkpoint = make_checkpoint(work / "digits-sd15", "sd15", "digits", overwrite=True)
    prompts_file = work / "digit-captions.txt"
    prompts_file.write_text("".join(digits.caption(d, p) + "\n" for p in digits.PHRASINGS for d in range(10)))
    prompts, digits_of, seeds = digits.eval_prompts(args.seeds)
    source = source_macs(checkpoint)
    chosen = variants(str(prompts_file))
    if args.only:
        wanted = {"none", *(n.strip() for n in args.only.split(","))}
        unknown = wanted - {v["name"] for v in chosen}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {[v['name'] for v in chosen]}")
        chosen = [v for v in chosen if v["name"] in wanted]
    results = new_results(NAME, PACKAGES, seeds_per_digit=args.seeds, images=len(prompts), threads=args.threads)
    results["judge_accuracy"] = list(digits.judge_accuracy())
    meter, rows, grids = CpuMeter(), [], []
    reference_images, reference = None, None
    for variant in chosen:
        log(f"{variant['name']}: {variant['recipe']!r} -> {variant['target']}")
        row, images = run_variant(variant, checkpoint, work, prompts, digits_of, seeds, reference_images, source)
        if variant["name"] == "none":
            reference_images, reference = images, row
        rows.append(row)
        grids.append(images)
        log(
            f"  accuracy {100 * row['prompt_accuracy']:.1f}%, Fréchet {row['frechet']:.1f}, "
            f"MACs/image {row['unet_macs_per_image'] / 1e9:.2f} G, compile {row['compile_s']:.0f} s"
        )
    results["rows"] = rows
    results["cpu"] = meter.stop()
    results["peak_rss_gib"] = peak_rss_gib()
    finish_results(results)
    text = table(rows, reference)
    print(text)
    if not args.no_results:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        save_grid(grids, [r["name"] for r in rows], args.results_dir / f"{NAME}.png", args.seeds)
        write_results(results, report(results, text), args.results_dir, NAME)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def own_defaults(rows: list[dict]) -> str:
    """'name: N steps at guidance G' for the rows that ran their artifact's recorded defaults."""
    parts = []
    for row in rows:
        defaults = row["call"].get("artifact defaults")
        if defaults is not None:
            steps, guidance = defaults.get("num_inference_steps", 50), defaults.get("guidance_scale", 7.5)
            parts.append(f"{row['name']}: {steps} steps at guidance {guidance:g}")
    return "; ".join(parts) or "none here"


def rewrite(json_path: Path) -> None:
    """Write the Markdown report again from a stored JSON (after a change to the report's wording)."""
    import json

    results = json.loads(json_path.read_text())
    reference = next(r for r in results["rows"] if r["name"] == "none")
    json_path.with_suffix(".md").write_text(report(results, table(results["rows"], reference)))


def report(results: dict, text: str) -> str:
    judge, judge_se = results["judge_accuracy"]
    machine = results["machine"]
    return "\n".join(
        [
            "# Every preset on the digits model, judged by what it draws",
            "",
            f"Written by `benchmarks/bench_quality_digits.py --seeds {results['seeds_per_digit']}` on "
            f"{results['date']}; machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
            f"{results['threads']} thread(s); other processes kept {results['cpu'].get('others_cores', 0):.2f} cores busy on "
            "average (timings are not the point here; MACs are counted, not timed).",
            "",
            f"{results['images']} images per variant ('a handwritten digit {{word}}' for each digit x seeds "
            f"0..{results['seeds_per_digit'] - 1}), 20 steps at guidance 5 unless the variant runs its artifact's "
            f"defaults ({own_defaults(results['rows'])}). "
            f"Judge: a classifier trained on real digits the model never saw, {100 * judge:.1f}% ± "
            f"{100 * judge_se:.1f} on held-out real digits. Fréchet distance: judge features, against the "
            "held-out real digits (200 real training-share digits: 13.6). PSNR / SSIM: against the `none` "
            "row's image for the same prompt and seed. MACs per image: counted while drawing (CFG rows count "
            "twice). Verdict: accuracy lost beyond two standard errors, or Fréchet distance up more than 25%.",
            "",
            text,
            "",
            "![a row per variant: digits 0-9 at seed 0](quality_digits.png)",
            "",
            "Budgets: distill 100 steps on 18 digit captions (teacher 20 steps); cfg-distill and lcm 200 steps; "
            "ptq / quest calibrated on 8 digit captions x 20 steps at guidance 5 (QuEST finetunes 20 + 40 steps).",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
