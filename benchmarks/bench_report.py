"""Benchmark report (`make bench`): our variants and the tools a user would otherwise pick, in one run, speed next
to fidelity, with plots.

    python benchmarks/bench_report.py [--tiny] [--variants none:onnx,none:torch,...] [--peers eager,...]
                                      [--steps 4] [--repeats 2] [--together 2] [--batch4-repeats 0]
                                      [--warmup 1] [--warmup-steps 1] [--held-out-calls 1] [--full]
                                      [--workdir benchmarks/.cache]
                                      [--out benchmarks/results] [--name report]

Default vs `--full` (`make bench` vs `make bench-full`): the issue asks `make bench` to fit a 2-core machine in
under 15 minutes with warm caches. The first full run (3 rounds, a batch-4 call per subject, one subject at a
time; results/report_full.md) spent 44.7 min measuring: the baseline's batch-4 calls (162 s each, at the start
and the end), every subject's batch-4 call (34-72 s, torch.compile's after a recompiling warm-up at batch 4) and a
third round (subject + baseline, ~30 s) per subject. A default of 2 rounds without batch-4 calls then took 18.8
min (warm caches, quiet 2-core CPU): the rounds 708 s, of which the baseline's calls (one per subject per round,
~22 s each) were ~440 s; loads 172 s, warm-ups 139 s, SQNR 59 s. So the default now loads two subjects together
(`--together 2`) and each round calls them around one baseline call (A, baseline, B; reversed the next round),
which halves the baseline's calls while every subject's call still sits next to the baseline call it is
compared with, warms each subject up with one call of the timed shapes at 1 step (`--warmup-steps 1`;
torch.compile's stays a whole call) and takes eps SQNR on one held-out input (`--held-out-calls 1`): 12.6 min
with warm caches (results/report.md; the first run on an empty cache, results/report_cold.md, 39.3 min). No
batch-4 calls (`--batch4-repeats 0`: the img/s batch 4 column says "not measured (--batch4-repeats 0)").
`--full` restores exactly the first run's settings (`--repeats 3 --batch4-repeats 1 --held-out-calls 2
--together 1 --warmup-steps 0`) and writes NAME_full.* (explicit flags still win). In both, the baseline's held-out sampling decodes its image and is its
warm-up call (one call fewer); torch.compile keeps its own warm-up after its compiling first call, since with a
cold inductor cache its second call compiles again. Each run stores where its time went (`phase_seconds`:
builds, the baseline's set-up, each subject's load / warm-up / rounds (its calls and its share of the baseline's)
/ batch 4 / SQNR) and shows the totals under the table; NAME_runs.json lists the runs with their wall time (the
first run of a cache, which builds everything, kept).

Source: the full SD1.5 architecture with random weights (`make_checkpoint(DIR, "sd15", "full")`; `--tiny`: the
tiny one), cached under `--workdir`, at a 32x32 latent (256 px; `--size`). Subjects:

- **baseline** `eager`: diffusers' `StableDiffusionPipeline.from_pretrained(CKPT)` called as a user calls it
  (fp32, default attention). Every other subject's ratios are against it, measured in the same rounds.
- **ours**, one per `--variants` item `RECIPE:TARGET`, compiled once with `sdcompiler compile` (cached; the
  first compile's time is reported) and loaded with `load_compiled`. Default: none on onnx and torch,
  bk-small, deepcache, gri, lcm-scheduler (its own 4 steps without CFG) and int8 on onnx.
- **peers** (`--peers`): `torch-compile` (the same diffusers pipeline with `pipe.unet = torch.compile(pipe.unet)`,
  inductor cache under `--workdir`), `optimum-onnx` (optimum's own exporter, `main_export`, run by optimum's
  `ORTDiffusionPipeline` on ONNX Runtime), `ort-int8` (ONNX Runtime's `quantize_static` of that export,
  benchmarks/bench_ort_int8.py: the peer of `int8`). A peer that cannot run (or is not asked for) is listed
  under "skipped" with the reason, never dropped.

Timing: one process, one intra-op thread count for torch and ONNX Runtime (SDCOMPILER_NUM_THREADS, else
torch's default). The baseline stays loaded; the other subjects are loaded in groups of `--together` (memory:
one group at a time next to the baseline), each gets `--warmup` calls after its load, then `--repeats` rounds
call the group's first half, the baseline, then the rest (same prompt, same seed; reversed order every other
round), so load on a shared machine hits a subject and its baseline call alike; a subject's speed-up is the ratio
of the medians of its calls and of the baseline calls of its rounds (2 rounds: the median is their mean). Then `--batch4-repeats` calls with 4 images per
prompt (images/s at batch 4; the baseline's batch-4 calls run at the start and at the end; none by default). Per call the U-Net's time and calls are recorded
(U-Net call latency = median of U-Net seconds / calls). Peak memory: the process's RSS sampled every 20 ms
while the subject loads and runs its warm-up (the same call as a timed one), minus the RSS before it loaded (the
baseline's share excluded, and that of the group's subjects loaded before it), and the absolute peak; on CUDA, torch's peak allocated memory (ONNX Runtime's GPU arena is not counted).

Fidelity: eps SQNR of each subject's U-Net vs the baseline's on held-out inputs (the baseline's own U-Net
inputs while it samples `--held-out-prompt`, not a timed prompt), and PSNR / SSIM of the first timed call's
image vs the baseline's image (same prompt, same seed). Random weights make the images noise-like: PSNR is a
drift measure there, not image quality.

Output (`--out`, `--name`): NAME.json (machine, settings, every call of every subject, skipped peers with
reasons), NAME.md (tables), NAME_latency_fidelity.png, NAME_params_macs.png, NAME_images.png.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_cache import ensure_artifact, ensure_checkpoint, ensure_optimum_export, ensure_ort_int8  # noqa: E402
from bench_common import CpuMeter, finish_results, log, new_results  # noqa: E402

NAME = "report"
FULL_SUFFIX = "_full"  # --full writes NAME_full.* unless --name says otherwise
# the default run (warm caches on a quiet 2-core CPU: 12.6 min, results/report_runs.json) and --full (the settings
# of the first full run: 3 rounds, a batch-4 call per subject, one subject at a time, whole warm-up calls); an
# explicit flag wins
DEFAULT_SETTINGS = {"repeats": 2, "batch4_repeats": 0, "held_out_calls": 1, "together": 2, "warmup_steps": 1}
FULL_SETTINGS = {"repeats": 3, "batch4_repeats": 1, "held_out_calls": 2, "together": 1, "warmup_steps": 0}
GPU_NAME = "gpu_e2e"  # benchmarks/bench_gpu_e2e.py's result on CUDA, under results/gpu/ (run_gpu_checks.sh)
CALL_ORDER = itertools.count()
RUNS_KEPT = 8  # runs listed in NAME_runs.json (the first run of a cache is kept besides)
PACKAGES = ("sd-compiler", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx")
DEFAULT_VARIANTS = "none:onnx,none:torch,bk-small:onnx,deepcache:onnx,gri:onnx,lcm-scheduler:onnx,int8:onnx"
ALL_PEERS = ("torch-compile", "optimum-onnx", "ort-int8")
PROMPT = "a red cube on a wooden table, studio light"
HELD_OUT_PROMPT = "a lighthouse on a cliff at sunset, oil painting"
CALIBRATION_PROMPTS = ("a photo of a cat on a sofa", "a mountain lake at dawn")


# --- subjects -----------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One pipeline under measurement: `call(batch, warmup_steps=None) -> (images, {"unet": s, "unet_calls": n})`
    (`warmup_steps`: an untimed call with fewer steps, same shapes)."""

    name: str
    kind: str  # "baseline" | "ours" | "peer"
    label: str
    steps: int
    guidance: float
    call: Callable[[int], tuple[Any, dict]]
    unet_eps: Callable[[Any, Any, Any], Any]  # (sample, timestep, encoder_hidden_states) -> eps (torch)
    facts: dict = field(default_factory=dict)  # params, MACs, bytes on disk, build
    calls: list[dict] = field(default_factory=list)
    images: Any = None  # first timed batch-1 call
    images4: Any = None  # first batch-4 call


def _timed_forward(obj, timer: dict) -> None:
    """Wrap obj.forward (a torch module, a torch.compile'd one, optimum's ORT U-Net) to add its seconds."""
    forward = obj.forward

    def run(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        timer["unet"] += time.perf_counter() - start
        timer["unet_calls"] += 1
        return out

    obj.forward = run


def diffusers_subject(name, kind, label, pipe, steps, guidance, size, seed, facts) -> Subject:
    """A diffusers-style pipeline (diffusers' own or optimum's ORT one), called as a user calls it."""
    import torch

    timer = {"unet": 0.0, "unet_calls": 0}
    _timed_forward(pipe.unet, timer)
    pipe.set_progress_bar_config(disable=True)

    def call(batch: int, warmup_steps: int | None = None):
        timer.update(unet=0.0, unet_calls=0)
        images = pipe(
            PROMPT,
            num_inference_steps=warmup_steps or steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            num_images_per_prompt=batch,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        return images, dict(timer)

    def unet_eps(sample, timestep, hidden):
        out = pipe.unet(sample=sample, timestep=timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        return torch.as_tensor(out).float()

    return Subject(name, kind, label, steps, guidance, call, unet_eps, facts)


def artifact_subject(name, folder: Path, steps, guidance, size, seed, device, facts) -> Subject:
    """Our artifact through `load_compiled` and the runtime's sampling loop (compiler/bench.py's timers)."""
    import torch

    from sdcompiler.bench import _subject, _timed
    from sdcompiler.sampling import generate

    subject = _subject(name, folder, device, False, None, None)
    defaults = json.loads((folder / "manifest.json").read_text()).get("defaults") or {}
    # a scheduler preset's own schedule (lcm-scheduler: 4 steps, no CFG); every other artifact records the
    # checkpoint's defaults (50 steps, guidance 7.5) and runs the report's steps and guidance like the baseline
    own = bool(
        defaults.get("timesteps")
        or defaults.get("num_inference_steps", 50) != 50
        or defaults.get("guidance_scale", 7.5) != 7.5
    )
    steps_used = subject.num_inference_steps if own else steps
    guidance_used = subject.guidance_scale if own else guidance
    timesteps = subject.timesteps if own else None
    components = subject.components
    if subject.unet_params is not None:  # else (no pass record, no torch U-Net): the source's, set by the caller
        facts.update(
            unet_params=subject.unet_params,
            macs_per_unet_call=subject.macs_per_unet_call,
            macs_resolution=list(subject.macs_resolution),
        )
    facts["own_schedule"] = own

    def call(batch: int, warmup_steps: int | None = None):
        timed, timer = _timed(components)
        images = generate(
            timed,
            [PROMPT],
            num_inference_steps=warmup_steps or steps_used,
            guidance_scale=guidance_used,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            num_images_per_prompt=batch,
            output_type="np",
            timesteps=timesteps[:warmup_steps] if timesteps and warmup_steps else timesteps,
        )
        return images, {"unet": timer["unet"], "unet_calls": timer["unet_calls"]}

    def unet_eps(sample, timestep, hidden):
        return torch.as_tensor(components.unet(sample, timestep, hidden)).float()

    return Subject(name, "ours", subject.label, steps_used, guidance_used, call, unet_eps, facts)


# --- measuring ----------------------------------------------------------------------------------------------------


class MemorySampler:
    """Peak RSS of this process (and torch's peak CUDA allocation) between start() and stop()."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        self.before = self.process.memory_info().rss
        self.peak = self.before
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.result = {
            "rss_before_gib": round(self.before / 2**30, 3),
            "peak_rss_gib": round(self.peak / 2**30, 3),
            "peak_rss_added_gib": round((self.peak - self.before) / 2**30, 3),
        }
        if torch.cuda.is_available():
            self.result["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)


def timed_call(
    subject: Subject, batch: int, phase: str, partners: list[str] | None = None, warmup_steps: int | None = None
) -> Any:
    """One call, recorded with its seconds and U-Net timer; `partners`: the subjects a baseline call is the
    reference for (the group of its round)."""
    start = time.perf_counter()
    images, timer = subject.call(batch, warmup_steps)
    seconds = time.perf_counter() - start
    subject.calls.append(
        {
            "phase": phase,
            "batch": batch,
            "seconds": seconds,
            **timer,
            "images": len(images),
            "partners": partners,
            "order": next(CALL_ORDER),  # the call's place in the run (all subjects)
        }
    )
    return images


def held_out_inputs(pipe, steps: int, guidance: float, size: int, count: int, output_type: str = "latent") -> list:
    """The baseline U-Net's inputs while it samples the held-out prompt; `count` of them, evenly spaced. With
    `output_type="np"` the call decodes its image too, so it serves as the baseline's first warm-up call."""
    import torch

    captured = []
    forward = pipe.unet.forward

    def capture(sample, timestep, encoder_hidden_states, *args, **kwargs):
        captured.append((sample.clone(), torch.as_tensor(timestep).clone(), encoder_hidden_states.clone()))
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    pipe.unet.forward = capture
    try:
        pipe(
            HELD_OUT_PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(1234),
            output_type=output_type,
        )
    finally:
        pipe.unet.forward = forward
    picks = sorted({round(i * (len(captured) - 1) / max(count - 1, 1)) for i in range(count)})
    return [captured[i] for i in picks]


def sqnr_db(reference: list, estimate: list) -> float | None:
    """10 log10(|ref|^2 / |ref - est|^2) over all held-out outputs; None when identical (infinite)."""
    signal = sum(float((r.double() ** 2).sum()) for r in reference)
    noise = sum(float(((r.double() - e.double()) ** 2).sum()) for r, e in zip(reference, estimate))
    return None if noise == 0 else 10 * math.log10(signal / noise)


def eps_outputs(subject: Subject, inputs: list[tuple]) -> list:
    import torch

    with torch.inference_mode():
        return [subject.unet_eps(s, t, h) for s, t, h in inputs]


def median_of(calls: list[dict], key: str, **where) -> float | None:
    values = [c[key] for c in calls if all(c.get(k) == v for k, v in where.items())]
    return statistics.median(values) if values else None


def summarize(subject: Subject, baseline: Subject | None) -> dict:
    timed = [c for c in subject.calls if c["phase"] == "timed" and c["batch"] == 1]
    out: dict[str, Any] = {
        "kind": subject.kind,
        "label": subject.label,
        "steps": subject.steps,
        "guidance_scale": subject.guidance,
        "image_seconds": _stats([c["seconds"] for c in timed]),
        "unet_calls_per_image": timed[0]["unet_calls"] if timed else None,
        "unet_call_seconds": statistics.median(c["unet"] / c["unet_calls"] for c in timed) if timed else None,
        "images_per_second_batch1": 1 / statistics.median(c["seconds"] for c in timed) if timed else None,
    }
    b4 = [c["seconds"] for c in subject.calls if c["phase"] == "batch4"]
    out["images_per_second_batch4"] = 4 / statistics.median(b4) if b4 else None
    if baseline is not None and subject is not baseline:
        partner = [c for c in baseline.calls if c["phase"] == "timed" and subject.name in (c["partners"] or [])]
        base_image = statistics.median(c["seconds"] for c in partner)
        base_unet = statistics.median(c["unet"] / c["unet_calls"] for c in partner)
        out["baseline_image_seconds_same_rounds"] = base_image
        out["speedup_image"] = base_image / out["image_seconds"]["median"]
        out["speedup_unet_call"] = base_unet / out["unet_call_seconds"]
    out.update(subject.facts)
    return out


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def manifest_build(folder: Path) -> dict:
    """Build seconds of an artifact compiled elsewhere: its passes' and lowering stages' seconds."""
    manifest = json.loads((folder / "manifest.json").read_text())
    seconds = sum(p.get("seconds") or 0 for p in manifest["passes"])
    seconds += sum(stage.get("seconds") or 0 for stage in manifest.get("lowering", {}).get("stages", []))
    return {"seconds": seconds, "what": "passes + lowering stages (manifest)", "cached": True}


def _du(path: Path) -> int:
    """Bytes under `path`, following links (the ORT INT8 folder links the export's components)."""
    total = 0
    for root, _, files in os.walk(path, followlinks=True):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class PhaseClock:
    """Seconds of each phase of the run (builds, the baseline's set-up, each subject's load / warm-up / rounds /
    batch 4 / SQNR): where a run's wall time goes, to size the defaults."""

    def __init__(self):
        self.clock = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.subjects: dict[str, dict[str, float]] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.clock, 1)
        self.clock = now

    def result(self) -> dict:
        totals = {}
        for subject in self.subjects.values():
            for key, seconds in subject.items():
                totals[key] = round(totals.get(key, 0.0) + seconds, 1)
        return {**self.phases, "subjects_by_phase": totals, "per_subject": self.subjects}


# --- the run ------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    phases = PhaseClock()  # from here: imports and the checkpoint count as "builds"
    import numpy as np
    import torch

    from sdcompiler import knobs
    from sdcompiler.bench import ssim
    from sdcompiler.passes import count_macs, count_params
    from sdcompiler.passes.teacher_data import psnr_db

    threads = knobs.apply_num_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = new_results(args.name, PACKAGES, threads=threads, device=device)
    results["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # before anything compiles: inductor fixes its cache folder at its first use in the process
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))
    size_name = "tiny" if args.tiny else "full"
    checkpoint, checkpoint_build = (args.checkpoint, {}) if args.checkpoint else ensure_checkpoint(workdir, size_name)
    size = args.size or (64 if args.tiny else 256)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    peers_asked = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers_asked) - set(ALL_PEERS))
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {', '.join(ALL_PEERS)}")
    results["settings"] = {
        "checkpoint": f"make_checkpoint(DIR, 'sd15', {size_name!r}, seed=0)"
        if not args.checkpoint
        else str(checkpoint),
        "size_px": size,
        "latent": size // 8,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "prompt": PROMPT,
        "held_out_prompt": HELD_OUT_PROMPT,
        "held_out_calls": args.held_out_calls,
        "warmup": args.warmup,
        "warmup_steps": args.warmup_steps or args.steps,
        "repeats": args.repeats,
        "together": args.together,
        "batch4_repeats": args.batch4_repeats,
        "full": args.full,
        "variants": variants,
        "peers": peers_asked,
        "threads": threads,
    }
    results["checkpoint_build"] = checkpoint_build
    skipped: dict[str, str] = {p: "not asked for (--peers)" for p in ALL_PEERS if p not in peers_asked}
    for item in args.left_out:  # NAME=REASON: a default subject this run leaves out, and why
        name, _, reason = item.partition("=")
        skipped[name] = f"left out of this run: {reason}"
    builds: dict[str, tuple[Path, dict]] = {}
    not_measured = {}
    if args.batch4_repeats == 0:
        not_measured["images_per_second_batch4"] = "not measured (--batch4-repeats 0)"

    # 1. build or reuse everything (compiles are not timed with the measurements)
    for index, variant in enumerate(variants):
        if "=" in variant:  # NAME=FOLDER: an artifact compiled elsewhere, its build time from its manifest
            name, _, folder = variant.partition("=")
            variants[index] = name
            builds[name] = (Path(folder), manifest_build(Path(folder)))
            continue
        recipe, _, target = variant.partition(":")
        try:
            builds[variant] = ensure_artifact(checkpoint, recipe, target or "onnx", workdir)
        except RuntimeError as exc:
            skipped[variant] = f"compile failed: {exc}"
    if "optimum-onnx" in peers_asked or "ort-int8" in peers_asked:
        try:
            builds["optimum-onnx"] = ensure_optimum_export(checkpoint, workdir)
        except RuntimeError as exc:
            for peer in ("optimum-onnx", "ort-int8"):
                if peer in peers_asked:
                    skipped[peer] = f"optimum's export failed: {exc}"
    if "ort-int8" in peers_asked and "optimum-onnx" in builds:
        try:
            builds["ort-int8"] = ensure_ort_int8(
                builds["optimum-onnx"][0], checkpoint, workdir, list(CALIBRATION_PROMPTS), args.steps
            )
        except RuntimeError as exc:
            skipped["ort-int8"] = f"quantize_static failed: {exc}"

    phases.lap("builds")
    meter = CpuMeter()  # the CPU other processes used while this run measured (a build is not measured)

    # 2. the baseline: diffusers eager, loaded once
    from diffusers import StableDiffusionPipeline

    log("loading the baseline (diffusers eager)")
    with MemorySampler() as memory:
        eager = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, safety_checker=None)
        eager = eager.to(device)
    vae_scale = eager.vae_scale_factor
    native = eager.unet.config.sample_size * vae_scale
    macs_resolution = (native, native)  # as our manifests count them (`macs_resolution`: the native size)
    source_facts = {
        "unet_params": count_params(eager.unet),
        "macs_per_unet_call": count_macs(eager.unet, macs_resolution, vae_scale),
        "macs_resolution": list(macs_resolution),
        "bytes": _du(checkpoint),
    }
    phases.lap("baseline_load")
    # the held-out prompt's sampling decodes its image and is the baseline's first warm-up call (saves one call)
    inputs = held_out_inputs(
        eager, args.steps, args.guidance, size, args.held_out_calls, "np" if args.warmup else "latent"
    )
    with torch.inference_mode():
        reference_eps = [eager.unet(s, t, encoder_hidden_states=h, return_dict=False)[0].float() for s, t, h in inputs]
    baseline = diffusers_subject(
        "eager",
        "baseline",
        "diffusers StableDiffusionPipeline, torch eager fp32",
        eager,
        args.steps,
        args.guidance,
        size,
        args.seed,
        {**source_facts, "memory": memory.result, "build": {"seconds": 0.0, "what": "from_pretrained"}},
    )
    for _ in range(args.warmup - 1):
        baseline.call(1)
    phases.lap("baseline_held_out_and_warmup")
    for _ in range(min(args.batch4_repeats, 1)):
        baseline.images4 = timed_call(baseline, 4, "batch4")
    phases.lap("baseline_batch4_start")

    # 3. every other subject, one at a time next to the baseline
    def loaders():
        for variant in variants:
            if variant in builds:
                folder, build = builds[variant]
                facts = {**source_facts, "bytes": _du(folder), "build": build, "recipe": variant}
                yield (
                    variant,
                    lambda variant=variant, folder=folder, facts=facts: artifact_subject(
                        variant, folder, args.steps, args.guidance, size, args.seed, device, facts
                    ),
                )
        if "torch-compile" in peers_asked:
            yield "torch-compile", lambda: torch_compile_subject(eager, args, size, source_facts, workdir)
        for peer in ("optimum-onnx", "ort-int8"):
            if peer in builds:
                yield peer, lambda peer=peer: optimum_subject(peer, builds[peer], args, size, source_facts, threads)

    subjects = [baseline]
    loads = list(loaders())
    for first in range(0, len(loads), args.together):
        group = []  # loaded together; each round calls them around one baseline call
        for name, load in loads[first : first + args.together]:
            log(f"loading {name}")
            try:
                with MemorySampler() as memory:
                    start = time.perf_counter()
                    subject = load()
                    subject_phases = {"load": round(time.perf_counter() - start, 1), **warm_up(subject, args)}
                subject.facts["memory"] = memory.result
                subject.facts["load_seconds"] = subject_phases["load"]
                group.append((subject, subject_phases))
            except Exception as exc:  # a peer or variant that cannot run is reported, never dropped
                cannot_run(name, exc, skipped, args)
        log(f"measuring {', '.join(s.name for s, _ in group)}")
        group = measure(group, baseline, args, skipped)
        for subject, subject_phases in group:
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    subject.facts["eps_sqnr_db"] = sqnr_db(reference_eps, eps_outputs(subject, inputs))
            except Exception as exc:
                cannot_run(subject.name, exc, skipped, args)
                continue
            subject_phases["sqnr"] = round(time.perf_counter() - start, 1)
            phases.subjects[subject.name] = subject_phases
            subjects.append(subject)
        for subject, _ in group:
            subject.call = subject.unet_eps = None  # drop the pipelines: one group in memory at a time
        del group
        gc.collect()
    phases.lap("subjects")
    for _ in range(min(args.batch4_repeats, 1)):
        timed_call(baseline, 4, "batch4")
    phases.lap("baseline_batch4_end")

    # 4. fidelity and the summary
    rows = {}
    for subject in subjects:
        row = summarize(subject, baseline)
        if subject is not baseline:
            row["psnr_db"] = psnr_db(baseline.images, subject.images)
            row["ssim"] = ssim(baseline.images, subject.images)
        rows[subject.name] = row  # a metric in not_measured stays None in every row
    results["subjects"] = rows
    results["not_measured"] = not_measured
    results["phase_seconds"] = phases.result()
    results["cpu_load_measuring"] = meter.stop()
    results["calls"] = {s.name: s.calls for s in subjects}
    results["skipped"] = skipped
    images = {s.name: np.asarray(s.images4 if s.images4 is not None else s.images) for s in subjects}
    finish_results(results)
    return results, images


def cannot_run(name: str, exc: Exception, skipped: dict, args) -> None:
    log(f"{name} cannot run: {exc}")
    skipped[name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    if args.debug:
        traceback.print_exc()


def warm_up(subject: Subject, args) -> dict:
    """`--warmup` untimed calls right after the load. torch.compile's compiling first call (its load) does not
    replace them: with a cold inductor cache its second call compiled again (a trial 1-round run without this
    warm-up: 153 s for that round)."""
    start = time.perf_counter()
    # the timed call's shapes with fewer steps (`--warmup-steps`); torch.compile's warm-up is a whole call
    steps = None if subject.facts.get("recompiles_per_shape") else args.warmup_steps
    for _ in range(args.warmup):
        timed_call(subject, 1, "warmup", warmup_steps=steps)
    return {"warmup": round(time.perf_counter() - start, 1)}


def measure(group: list[tuple[Subject, dict]], baseline: Subject, args, skipped: dict) -> list:
    """The alternating rounds of a group of subjects loaded together, then their batch-4 calls; adds each one's
    seconds to its phases (its own calls plus its share of the baseline calls) and returns those that ran.

    A round calls the group's first half, the baseline, then the rest ((A, baseline, B) for two), in reversed
    order every other round, so each subject's calls sit next to the baseline call its speed-up is measured
    against (`partners` of that call), and one baseline call serves the whole group."""
    alive = list(group)

    def call(subject, phases, batch, phase, key, partners=None):
        start = time.perf_counter()
        try:
            return timed_call(subject, batch, phase, partners)
        except Exception as exc:
            cannot_run(subject.name, exc, skipped, args)
            alive[:] = [pair for pair in alive if pair[0] is not subject]
        finally:
            phases[key] = round(phases.get(key, 0.0) + time.perf_counter() - start, 1)

    for repeat in range(args.repeats):
        order = list(alive) if repeat % 2 == 0 else alive[::-1]  # a copy: a failing call drops its subject
        half = (len(order) + 1) // 2
        for subject, phases in order[:half]:
            images = call(subject, phases, 1, "timed", "rounds")
            if repeat == 0 and images is not None:
                subject.images = images
        if not alive:
            break
        start = time.perf_counter()
        base = timed_call(baseline, 1, "timed", [s.name for s, _ in alive])
        share = (time.perf_counter() - start) / len(alive)
        for _, phases in alive:
            phases["rounds"] = round(phases.get("rounds", 0.0) + share, 1)
        if baseline.images is None:
            baseline.images = base
        for subject, phases in order[half:]:
            images = call(subject, phases, 1, "timed", "rounds")
            if repeat == 0 and images is not None:
                subject.images = images
    for subject, phases in list(alive):
        phases["batch4"] = 0.0
        for repeat in range(args.batch4_repeats):
            if repeat == 0 and subject.facts.get("recompiles_per_shape"):
                try:
                    subject.call(4)  # torch.compile compiles again for a new batch: a warm-up at batch 4
                except Exception as exc:
                    cannot_run(subject.name, exc, skipped, args)
                    alive.remove((subject, phases))
                    break
            images = call(subject, phases, 4, "batch4", "batch4")
            if images is None:
                break
            if repeat == 0:
                subject.images4 = images
    return alive


def torch_compile_subject(eager, args, size, source_facts, workdir: Path) -> Subject:
    """diffusers + `pipe.unet = torch.compile(pipe.unet)` (inductor, default mode), sharing the baseline's
    weights; the first call's seconds (compilation) are recorded as its build time."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{**eager.components, "unet": torch.compile(eager.unet)})
    subject = diffusers_subject(
        "torch-compile",
        "peer",
        "diffusers + torch.compile(pipe.unet) (inductor)",
        pipe,
        args.steps,
        args.guidance,
        size,
        args.seed,
        {**source_facts, "recompiles_per_shape": True},
    )
    start = time.perf_counter()
    subject.call(1)  # compiles (warm inductor cache: loads)
    subject.facts["build"] = {"seconds": time.perf_counter() - start, "what": "first call (torch.compile)"}
    return subject


def optimum_subject(peer: str, build: tuple[Path, dict], args, size, source_facts, threads) -> Subject:
    """optimum's ORTDiffusionPipeline over its own export (or ORT's INT8 of it), ONNX Runtime CPU/CUDA."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTDiffusionPipeline

    folder, built = build
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    provider = "CUDAExecutionProvider" if torch.cuda.is_available() else "CPUExecutionProvider"
    pipe = ORTDiffusionPipeline.from_pretrained(folder, provider=provider, session_options=options)
    label = {
        "optimum-onnx": "optimum's ONNX export, optimum ORTDiffusionPipeline (ONNX Runtime fp32)",
        "ort-int8": "ONNX Runtime quantize_static INT8 (QDQ, U8/S8 per-channel, MinMax) of optimum's export",
    }[peer]
    facts = {**source_facts, "bytes": _du(folder), "build": built}
    if peer == "ort-int8":
        facts["quantization"] = json.loads((folder / "quantization.json").read_text())
    return diffusers_subject(peer, "peer", label, pipe, args.steps, args.guidance, size, args.seed, facts)


# --- output -------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def gpu_rows(path: Path, skipped: dict[str, str]) -> str | None:
    """The GPU rows: the stored Markdown of benchmarks/bench_gpu_e2e.py's CUDA run (one harness: this report
    reads its result, it does not measure GPUs itself); absent, they are listed as skipped with the reason."""
    if path.is_file():
        return path.read_text()
    skipped["gpu-e2e"] = (
        f"no stored GPU run ({path.name} is not under {path.parent.name}/): no session has had a GPU lent; "
        "benchmarks/run_gpu_checks.sh on a CUDA machine writes it, and this report then shows its rows"
    )
    return None


def run_layout(settings: dict) -> str:
    """The settings that size a run's measuring time, in a few words (the runs table's "layout")."""
    return (
        f"{settings['repeats']} rounds, {settings.get('together', 1)} together, "
        f"warm-up {settings.get('warmup_steps', settings['steps'])} of {settings['steps']} steps, "
        f"{settings['held_out_calls']} held-out, {settings['batch4_repeats']} batch-4"
    )


def record_run(results: dict, history: Path) -> list[dict]:
    """Append this run (wall time, what it built and what it took from the cache) to `history` and return the
    runs kept there: the latest run from a cold cache stays listed next to the latest warm ones."""
    builds = {name: r.get("build") or {} for name, r in results["subjects"].items()}
    built = {name: b["seconds"] for name, b in builds.items() if b.get("seconds") and b.get("cached") is False}
    entry = {
        "date": results["date"],
        "wall_seconds": results["wall_seconds"],
        "built_in_run": built,
        "built_in_run_seconds": round(sum(built.values()), 1),
        "cached": sorted(name for name, b in builds.items() if b.get("cached")),
        "subjects": len(results["subjects"]),
        "layout": run_layout(results["settings"]),
        "skipped": sorted(results["skipped"]),
        "load_average": results["load_average"],
        "others_cores_measuring": (results.get("cpu_load_measuring") or {}).get("others_cores"),
    }
    try:
        runs = json.loads(history.read_text()) if history.is_file() else []
    except json.JSONDecodeError:
        runs = []
    runs.append(entry)
    cold = [r for r in runs if not r["cached"] and r["built_in_run"]][-1:]
    kept = runs[-RUNS_KEPT:]
    runs = cold + [r for r in kept if r not in cold]
    history.write_text(json.dumps(runs, indent=2) + "\n")
    return runs


def markdown(results: dict, plots: list[str], gpu_table: str | None = None) -> str:
    m, s = results["machine"], results["settings"]
    load = results["load_average"]
    lines = [
        f"# Benchmark report ({results['date']})",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['mem_total_gib']} GiB RAM, GPU "
        f"{m.get('gpu') or 'none'}; {s['threads']} intra-op thread(s) for torch and ONNX Runtime; load average "
        f"{load['start']} at the start, {load.get('end')} at the end.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.",
        "",
        f"Source: {s['checkpoint']} (random weights), {s['size_px']}x{s['size_px']} px ({s['latent']}x{s['latent']} "
        f"latent), {s['steps']} steps, guidance {s['guidance_scale']}, seed {s['seed']}, one prompt; "
        f"{s['warmup']} warm-up call(s) of {s.get('warmup_steps', s['steps'])} step(s) (torch.compile's: "
        f"{s['steps']}), then {s['repeats']} rounds at batch 1 of "
        + ("(subject, baseline)" if s.get("together", 1) == 1 else f"{s['together']} subjects around one baseline call")
        + f" and "
        f"{s['batch4_repeats']} call(s) at batch 4 per subject{' (--full)' if s.get('full') else ''}. Speed-ups: the baseline's median over the same "
        "rounds / the subject's. eps SQNR: U-Net output vs the baseline's on "
        f"{s['held_out_calls']} held-out inputs; PSNR / SSIM: the image vs the baseline's (same prompt and seed).",
        "",
        "| subject | kind | steps / CFG | image s (median, min-max) | speed-up | U-Net call s | U-Net calls "
        "| speed-up per U-Net call | img/s batch 1 | img/s batch 4 | peak RSS added GiB | U-Net params M "
        "| GMACs per U-Net call | size GiB | build s | eps SQNR dB | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    not_measured = results.get("not_measured") or {}
    batch4_missing = not_measured.get("images_per_second_batch4", "-")
    for name, r in results["subjects"].items():
        image = r["image_seconds"]
        build = r.get("build") or {}
        sqnr = r.get("eps_sqnr_db", "baseline")
        sqnr_text = "exact" if name != "eager" and sqnr is None else _fmt(sqnr, ".1f") if name != "eager" else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{name}**" if r["kind"] == "ours" else name,
                    r["kind"],
                    f"{r['steps']} / {r['guidance_scale']:g}",
                    f"{image['median']:.3f} ({image['min']:.3f}-{image['max']:.3f})",
                    _fmt(r.get("speedup_image"), ".2f", "1") + "x",
                    _fmt(r["unet_call_seconds"], ".3f"),
                    str(r["unet_calls_per_image"]),
                    _fmt(r.get("speedup_unet_call"), ".2f", "1") + "x",
                    _fmt(r["images_per_second_batch1"], ".3f"),
                    _fmt(r["images_per_second_batch4"], ".3f", batch4_missing),
                    _fmt((r.get("memory") or {}).get("peak_rss_added_gib"), ".2f"),
                    _fmt(r["unet_params"] / 1e6 if r.get("unet_params") else None, ".1f"),
                    _fmt(r["macs_per_unet_call"] / 1e9 if r.get("macs_per_unet_call") else None, ".2f"),
                    _fmt(r["bytes"] / 2**30 if r.get("bytes") else None, ".2f"),
                    _fmt(build.get("seconds"), ".1f") + (" (cached)" if build.get("cached") else ""),
                    sqnr_text,
                    _fmt(r.get("psnr_db"), ".1f"),
                    _fmt(r.get("ssim"), ".3f"),
                ]
            )
            + " |"
        )
    lines += ["", "Skipped (not measured in this run):", ""]
    lines += [f"- {name}: {reason}" for name, reason in results["skipped"].items()] or ["- none"]
    lines += [f"- {metric} (every subject): {reason}" for metric, reason in not_measured.items()]
    if results.get("phase_seconds"):
        p = results["phase_seconds"]
        by = p["subjects_by_phase"]
        lines += [
            "",
            f"Where this run's {results['wall_seconds']:.0f} s went: builds {p['builds']:.0f} s, the baseline's "
            f"load {p['baseline_load']:.0f} s, its held-out sampling and warm-up "
            f"{p['baseline_held_out_and_warmup']:.0f} s, its batch-4 calls "
            f"{p['baseline_batch4_start'] + p['baseline_batch4_end']:.0f} s; the {len(p['per_subject'])} other "
            f"subjects {p['subjects']:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in by.items())
            + "; `phase_seconds` in the JSON has them per subject)."
            + (
                f" While it measured, other processes kept {cpu['others_cores']:.2f} of the "
                f"{m['cpu_count']} cores busy on average."
                if (cpu := results.get("cpu_load_measuring"))
                else ""
            ),
        ]
    lines += [
        "",
        "Notes: the baseline's U-Net params / MACs / size are the source checkpoint's (optimum's export and the "
        "ORT INT8 peer run the same U-Net: their params and MACs are the source's, as are those of our "
        "variants without a structural pass); MACs per batch-1 U-Net call at the native "
        f"{results['subjects']['eager']['macs_resolution'][0]} px (the artifacts' recorded `macs_resolution`), "
        "not at the timed size. Build s: the first build's time (compile, export, quantization, "
        "torch.compile's first call), kept from the first run when cached. Peak RSS added: the process's peak "
        "while the subject loaded and ran its warm-up, minus its RSS before (the baseline's share, and with "
        "--together > 1 the static share of the subjects loaded before it in its group).",
    ]
    if results.get("other_busy_processes"):
        lines += ["", "Other busy processes: " + "; ".join(results["other_busy_processes"])]
    if results.get("runs"):
        lines += [
            "",
            "Runs of this report (wall time of the whole `bench_report.py` run: builds plus measurements; a build "
            "is cached after its first run):",
            "",
            "| date | wall min | built in the run | build min | from the cache | subjects measured | layout | load "
            "average start / end |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["runs"]:
            load = r["load_average"]
            lines.append(
                f"| {r['date']} | {r['wall_seconds'] / 60:.1f} | {', '.join(r['built_in_run']) or '-'} | "
                f"{r['built_in_run_seconds'] / 60:.1f} | {', '.join(r['cached']) or '-'} | {r['subjects']} | "
                f"{r.get('layout', '-')} | "
                f"{load.get('start')} / {load.get('end')} |"
            )
    if gpu_table:
        lines += ["", "## GPU rows (the stored run of benchmarks/bench_gpu_e2e.py)", "", gpu_table.strip()]
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(lines) + "\n"


def plot(results: dict, images: dict, out: Path, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["subjects"]
    written = []
    markers = {"baseline": ("s", "black"), "ours": ("o", "tab:blue"), "peer": ("^", "tab:red")}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("ours", "peer"):
        points = [(n, r) for n, r in rows.items() if r["kind"] == kind and r.get("psnr_db") is not None]
        if points:
            marker, color = markers[kind]
            xs = [r["image_seconds"]["median"] for _, r in points]
            ys = [min(r["psnr_db"], 100.0) for _, r in points]
            ax.scatter(xs, ys, marker=marker, color=color, s=60, label={"ours": "sdcompiler", "peer": "peers"}[kind])
            for (n, _), x, y in zip(points, xs, ys):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    base = rows["eager"]["image_seconds"]["median"]
    ax.axvline(base, color="black", linestyle="--", linewidth=1, label="diffusers eager (baseline)")
    ax.set_xlabel("seconds per image (median, batch 1)")
    ax.set_ylabel("image PSNR vs baseline, dB (100 = identical)")
    ax.set_title("latency vs fidelity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(f"{name}_latency_fidelity.png")
    fig.savefig(out / written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5))
    names = list(rows)
    colors = [markers[rows[n]["kind"]][1] for n in names]
    for ax, key, scale, title in (
        (axes[0], "unet_params", 1e6, "U-Net params (M)"),
        (axes[1], "macs_per_unet_call", 1e9, "GMACs per U-Net call"),
    ):
        values = [(rows[n].get(key) or 0) / scale for n in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(title)
    fig.tight_layout()
    written.append(f"{name}_params_macs.png")
    fig.savefig(out / written[-1], dpi=110)
    plt.close(fig)

    columns = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(images), columns, figsize=(1.6 * columns + 1.2, 1.6 * len(images)), squeeze=False)
    for row, (n, batch) in enumerate(images.items()):
        for col in range(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(batch):
                ax.imshow(np.clip(batch[col], 0, 1))
            if col == 0:
                ax.set_ylabel(n, fontsize=8)
    fig.suptitle(f"same prompt and seed ({results['settings']['seed']}), one row per subject", fontsize=9)
    fig.tight_layout()
    written.append(f"{name}_images.png")
    fig.savefig(out / written[-1], dpi=90)
    plt.close(fig)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's settings: the default (`make bench`) or `--full` ones where a flag is not given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny SD1.5 checkpoint (CI, tests)")
    parser.add_argument("--checkpoint", type=Path, help="a diffusers SD 1.x/2.x folder instead of make_checkpoint's")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated RECIPE:TARGET items (compiled once, cached) or NAME=ARTIFACT_FOLDER ones",
    )
    parser.add_argument("--peers", default=",".join(ALL_PEERS), help=f"of {', '.join(ALL_PEERS)} ('' for none)")
    parser.add_argument("--size", type=int, default=None, help="pixels (default 256; --tiny 64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help=f"rounds (default {DEFAULT_SETTINGS['repeats']})")
    parser.add_argument(
        "--batch4-repeats",
        type=int,
        default=None,
        help=f"batch-4 calls per subject (default {DEFAULT_SETTINGS['batch4_repeats']}: not measured)",
    )
    parser.add_argument("--held-out-calls", type=int, default=None, help="held-out U-Net inputs for eps SQNR")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps of a subject's warm-up calls (same shapes as the timed ones; 0: the timed steps; torch.compile's "
        f"warm-up always runs them; default {DEFAULT_SETTINGS['warmup_steps']})",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=None,
        help=f"subjects loaded together, sharing each round's baseline call (default {DEFAULT_SETTINGS['together']})",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the first full run's settings ({', '.join(f'{k} {v}' for k, v in FULL_SETTINGS.items())}) "
        f"written as NAME{FULL_SUFFIX}.* (`make bench-full`); explicit flags still win",
    )
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help=f"default {NAME} ({NAME}{FULL_SUFFIX} with --full)")
    parser.add_argument(
        "--left-out",
        action="append",
        default=[],
        metavar="NAME=REASON",
        help="a subject this run leaves out and why (listed under skipped); repeatable",
    )
    parser.add_argument(
        "--gpu-results",
        type=Path,
        default=HERE / "results" / "gpu" / f"{GPU_NAME}.md",
        help="the stored run of benchmarks/bench_gpu_e2e.py whose table the report shows (GPU rows)",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of a subject that cannot run")
    args = parser.parse_args(argv)
    for key, value in (FULL_SETTINGS if args.full else DEFAULT_SETTINGS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.name is None:
        args.name = NAME + (FULL_SUFFIX if args.full else "")
    if args.repeats < 1 or args.together < 1 or min(args.warmup, args.batch4_repeats, args.warmup_steps) < 0:
        parser.error("--repeats and --together must be >= 1, --warmup, --warmup-steps and --batch4-repeats >= 0")
    if args.held_out_calls < 1:
        parser.error("--held-out-calls must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    results, images = run(args)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    gpu_table = gpu_rows(args.gpu_results, results["skipped"])
    args.out.mkdir(parents=True, exist_ok=True)
    results["runs"] = record_run(results, args.out / f"{args.name}_runs.json")
    plots = plot(results, images, args.out, args.name)
    results["plots"] = plots
    table = markdown(results, plots, gpu_table)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
