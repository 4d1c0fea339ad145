"""Measure a compiled pipeline end to end: time per image by stage, against a baseline, and image quality.

    from sdcompiler import benchmark, load_compiled
    report = benchmark(load_compiled("out/"), baseline="ckpt/", prompts=["a red cube"], repeats=5)
    print(report.markdown())      # or report.to_dict(); the CLI: `sdcompiler bench out/ --baseline ckpt/`

Each subject (the candidate artifact, and the optional baseline: another
artifact or the source checkpoint run through the same sampling loop) is
called with the same prompts and the same seed; calls alternate between the
subjects after the warm-up calls, so load on a shared machine hits both alike.
The components are wrapped with timers (every component returns host tensors,
so a GPU call has finished when its wrapper stops the clock), which splits
each call into text encoding, U-Net calls, VAE decoding and the rest
(tokenization, scheduler steps, image conversion). Speed-ups are ratios of
medians.

Both subjects run with one intra-op thread count: SDCOMPILER_NUM_THREADS where
set, else torch's default, applied to torch and given to ONNX Runtime sessions
alike (with more threads than free cores, torch's OpenMP barriers wait on
descheduled threads and an eager baseline's calls vary 10x between repeats).
The report flags timings it cannot vouch for: a subject whose slowest call
took over SPREAD_LIMIT times its fastest (the same prompts, so the machine
changed), or a load average above the core count at the start or the end.
Quality is measured on the first timed call's images: PSNR and SSIM
against the baseline's images, and CLIP score per subject with a local CLIP
model (`clip_model=`, a transformers folder such as openai/clip-vit-large-patch14;
no machine here has one, so the tests use a tiny random CLIP).
When the candidate's source or the baseline is the shipped digits model
(`sdcompiler.digits.is_digits_model`), the digits judge adds each subject's
prompt accuracy: the share of its images the classifier reads as the digit
its prompt names. Without prompts the digits model gets the judge's fixed
prompts (one per digit); prompts that do not each name one digit get no
accuracy, and the report says why.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdcompiler import knobs
from sdcompiler.errors import ConfigError
from sdcompiler.sampling import Components, generate

STAGES = ("text_encoder", "unet", "vae_decoder", "other")
SPREAD_LIMIT = 1.5  # slowest / fastest timed call of one subject above which its timings are flagged
# what a requirement may name: the quality keys need a baseline (PSNR, SSIM) or a CLIP model, the speed-ups a baseline
GATE_METRICS = (
    "psnr_db",
    "ssim",
    "clip_score_candidate",
    "clip_score_baseline",
    "prompt_accuracy_candidate",
    "prompt_accuracy_baseline",
    "speedup",
    "unet_call_speedup",
    "seconds_per_image",
    "images_per_second",
)
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_REQUIREMENT = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    """A gate on one measured value, such as `psnr_db>=25` or `speedup>1.3` (for CI export scripts)."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Requirement":
        match = _REQUIREMENT.match(text)
        if not match:
            raise ConfigError(f"requirement {text!r} must look like METRIC>=NUMBER (or >, <=, <), e.g. psnr_db>=25")
        metric, op, value = match.groups()
        if metric not in GATE_METRICS:
            raise ConfigError(f"requirement {text!r} names unknown metric {metric!r}; known: {', '.join(GATE_METRICS)}")
        return cls(metric, op, float(value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


DEFAULT_PROMPTS = ("a red cube on a wooden table, studio light",)


class NoisyTimingWarning(RuntimeWarning):
    """The timings vary too much between repeats, or the machine was busy: speed-ups may be far off."""


@dataclass
class Subject:
    """One pipeline under measurement."""

    name: str  # "candidate" / "baseline"
    label: str  # what it is, for the report
    components: Components
    num_inference_steps: int
    guidance_scale: float
    timesteps: list[int] | None = None
    disk_bytes: int | None = None
    unet_params: int | None = None
    macs_per_unet_call: int | None = None  # a full batch-1 U-Net call at macs_resolution (pixels)
    macs_resolution: tuple[int, int] | None = None
    calls: list[dict[str, float]] = field(default_factory=list)  # per timed call: stage -> seconds, counts
    images: np.ndarray | None = None  # the first timed call's images

    def spread(self) -> float:
        """Slowest / fastest timed call with the same prompts (the worst chunk of prompts)."""
        chunks: dict[int, list[float]] = {}
        for c in self.calls:
            chunks.setdefault(c.get("chunk", 0), []).append(c["total"])
        return max(max(t) / min(t) if min(t) > 0 else float("inf") for t in chunks.values())

    def summary(self) -> dict[str, Any]:
        totals = [c["total"] for c in self.calls]
        out = {
            "label": self.label,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seconds_per_call": _stats(totals),
            "spread": self.spread(),
            "seconds_per_image": statistics.median(c["total"] / c["images"] for c in self.calls),
            "images_per_second": 1 / statistics.median(c["total"] / c["images"] for c in self.calls),
            "stages_seconds": {s: statistics.median(c[s] for c in self.calls) for s in STAGES},
            "unet_calls": self.calls[0]["unet_calls"],
            "shallow_unet_calls": self.calls[0]["shallow_calls"],
            "seconds_per_unet_call": statistics.median(c["unet"] / c["unet_calls"] for c in self.calls),
        }
        for key in ("disk_bytes", "unet_params", "macs_per_unet_call", "macs_resolution"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class BenchReport:
    settings: dict[str, Any]
    subjects: list[Subject]
    quality: dict[str, float]  # candidate vs baseline (psnr_db, ssim); clip scores, prompt accuracy per subject
    judge: dict[str, Any] | None = None  # the digits judge's record: None unless the digits model was detected

    def to_dict(self) -> dict[str, Any]:
        out = {
            "settings": self.settings,
            "quality": self.quality,
            "subjects": {s.name: s.summary() for s in self.subjects},
        }
        if self.judge is not None:
            out["judge"] = self.judge
        if len(self.subjects) == 2:
            cand, base = (out["subjects"][s.name] for s in self.subjects)
            out["speedup"] = base["seconds_per_call"]["median"] / cand["seconds_per_call"]["median"]
            out["unet_call_speedup"] = base["seconds_per_unet_call"] / cand["seconds_per_unet_call"]
        out["timing_warnings"] = self.timing_warnings()
        out["noisy"] = bool(out["timing_warnings"])
        return out

    def timing_warnings(self) -> list[str]:
        """Why the timings may be off, one line each (empty: the repeats agree and the machine was not busy)."""
        lines = []
        for s in self.subjects:
            if s.spread() > SPREAD_LIMIT:
                times = _stats([c["total"] for c in s.calls])
                lines.append(
                    f"{s.name} calls took {times['min']:.4g}-{times['max']:.4g} s ({s.spread():.2f}x apart, "
                    f"over {SPREAD_LIMIT}x)"
                )
        cores, load = self.settings.get("cores"), self.settings.get("load_average") or {}
        busy = {when: value for when, value in load.items() if value is not None and cores and value > cores}
        if busy:
            lines.append(
                "machine busy: load average "
                + ", ".join(f"{value:.2f} at the {when}" for when, value in busy.items())
                + f" on {cores} cores"
            )
        if lines:
            lines.append(
                "timings may be far off: rerun on an idle machine, or with fewer threads (SDCOMPILER_NUM_THREADS=1)"
            )
        return lines

    def metrics(self) -> dict[str, float]:
        """The values requirements can gate: quality, speed-ups vs the baseline, and the candidate's speed."""
        data = self.to_dict()
        candidate = data["subjects"]["candidate"]
        out = dict(self.quality)
        out.update({k: data[k] for k in ("speedup", "unet_call_speedup") if k in data})
        out.update(seconds_per_image=candidate["seconds_per_image"], images_per_second=candidate["images_per_second"])
        return out

    def check(self, requirements: Sequence[Requirement | str]) -> list[str]:
        """The requirements the measured values miss, one line each (empty: all met)."""
        metrics, failures = self.metrics(), []
        for requirement in requirements:
            r = requirement if isinstance(requirement, Requirement) else Requirement.parse(requirement)
            if r.metric not in metrics:
                failures.append(f"{r}: {r.metric} was not measured ({_needs(r.metric)})")
            elif not _COMPARE[r.op](metrics[r.metric], r.value):
                failures.append(f"{r}: measured {metrics[r.metric]:.4g}")
        return failures

    def markdown(self) -> str:
        data = self.to_dict()
        subjects = [data["subjects"][s.name] for s in self.subjects]
        names = [s.name for s in self.subjects]
        rows: list[tuple[str, list[str]]] = [
            ("what", [s["label"] for s in subjects]),
            ("steps / guidance", [f"{s['num_inference_steps']} / {s['guidance_scale']:g}" for s in subjects]),
            ("s per call (median, min-max)", [_fmt_stats(s["seconds_per_call"]) for s in subjects]),
            ("slowest / fastest call", [f"{s['spread']:.3g}" for s in subjects]),
            ("s per image", [f"{s['seconds_per_image']:.4g}" for s in subjects]),
            ("images per s", [f"{s['images_per_second']:.4g}" for s in subjects]),
        ]
        rows += [(f"  {stage} s", [f"{s['stages_seconds'][stage]:.4g}" for s in subjects]) for stage in STAGES]
        rows.append(
            ("U-Net calls per call (shallow)", [f"{s['unet_calls']} ({s['shallow_unet_calls']})" for s in subjects])
        )
        rows.append(("s per U-Net call", [f"{s['seconds_per_unet_call']:.4g}" for s in subjects]))
        for key, title, scale, unit in (
            ("unet_params", "U-Net params", 1e6, "M"),
            ("macs_per_unet_call", "U-Net MACs per full call, batch 1", 1e9, "G"),
            ("disk_bytes", "on disk", 2**30, " GiB"),
        ):
            if any(key in s for s in subjects):
                cells = [f"{s[key] / scale:.4g}{unit}" if key in s else "-" for s in subjects]
                if key == "macs_per_unet_call":
                    cells = [
                        c + (" @ {}x{} px".format(*s["macs_resolution"]) if key in s else "")
                        for c, s in zip(cells, subjects)
                    ]
                rows.append((title, cells))
        lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows]
        settings = self.settings
        calls = settings["calls_per_repeat"]
        per_repeat = f" x {calls} calls" if calls > 1 else ""
        machine = ""
        if "threads" in settings:
            load = settings.get("load_average") or {}
            machine = (
                f"; {settings['threads']} intra-op thread(s) for torch and ONNX Runtime, {settings['cores']} cores"
            )
            if load.get("start") is not None and load.get("end") is not None:
                machine += f", load average {load['start']:.2f} -> {load['end']:.2f}"
        text = [
            f"sdcompiler bench: {settings['images_per_call']} image(s) per call at "
            f"{settings['height']}x{settings['width']}, device {settings['device']}, {settings['warmup']} "
            f"warm-up + {settings['repeats']}{per_repeat} timed calls per subject (alternating), seed "
            f"{settings['seed']}{machine}",
            "",
            *lines,
        ]
        if "speedup" in data:
            text += [
                "",
                f"speed-up (baseline / candidate, medians): {data['speedup']:.3f}x per call, "
                f"{data['unet_call_speedup']:.3f}x per U-Net call",
            ]
        if self.quality:
            text += ["", "quality: " + ", ".join(f"{k} {v:.4g}" for k, v in self.quality.items())]
        if self.judge is not None:
            text += ["", _judge_line(self.judge)]
        if data["timing_warnings"]:
            text += ["", *(f"warning: {line}" for line in data["timing_warnings"])]
        return "\n".join(text) + "\n"


def benchmark(
    candidate,
    baseline=None,
    *,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    device: str | None = None,
    feature_cache: bool = True,
    clip_model: str | Path | None = None,
    allow_pickle: bool = False,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    verify: bool = True,
) -> BenchReport:
    """Time `candidate` (a CompiledPipeline or an artifact folder) and optionally `baseline` (a
    CompiledPipeline, an artifact folder, or a checkpoint: diffusers folder, .safetensors file, cached HF id).

    Steps and guidance default to each subject's own (an artifact's recorded defaults; 50 steps and the
    arch's guidance for a checkpoint), so a 4-step LCM artifact is compared with its 50-step teacher.
    `options`: load-time target options for the candidate artifact (`load_compiled(..., options=)`), e.g.
    `{"compile": True}` against the same artifact without them as the baseline.
    `batch_size`: prompts per call (default: all in one call); a repeat then calls each chunk of prompts in
    turn (seed + chunk index), which is how a quality run over a long prompt list fits in memory.
    `verify`: check artifact folders' files against their manifests' sha256 before loading (as `load_compiled`).
    """
    if not _is_int(repeats) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r}: at least one timed call per subject is needed")
    if not _is_int(warmup) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r} must be a non-negative integer")
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ConfigError("num_images_per_prompt must be a positive integer")
    from sdcompiler import digits

    judged = any(digits.is_digits_model(what) for what in (candidate, baseline) if what is not None)
    if not prompts:
        prompts = digits.eval_prompts(1)[0] if judged else DEFAULT_PROMPTS
    prompts = list(prompts)
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (prompts per call)")
    step = batch_size or len(prompts)
    chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = knobs.apply_num_threads()  # before loading: ONNX Runtime sessions take torch's count
    load_at_start = _load_average()
    scorer = _ClipScorer(clip_model, allow_pickle) if clip_model is not None else None  # fail before timing
    subjects = [
        _subject(
            "candidate",
            candidate,
            device,
            allow_pickle,
            num_inference_steps,
            guidance_scale,
            options=options,
            verify=verify,
        )
    ]
    if baseline is not None:
        subjects.append(
            _subject(
                "baseline",
                baseline,
                device,
                allow_pickle,
                num_inference_steps,
                guidance_scale,
                macs_resolution=subjects[0].macs_resolution,
                verify=verify,
            )
        )
        if subjects[0].components.is_sdxl != subjects[1].components.is_sdxl:
            raise ConfigError(
                "the candidate and the baseline are different model families (SDXL vs SD 1.x/2.x); "
                "compare an artifact with its own source checkpoint"
            )
    size = subjects[0].components.default_size
    height = size if height is None else height
    width = size if width is None else width
    settings = {
        "prompts": prompts,
        "images_per_call": len(chunks[0]) * num_images_per_prompt,
        "calls_per_repeat": len(chunks),
        "height": height,
        "width": width,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "device": device,
        "feature_cache": feature_cache,
        "threads": threads,
        "cores": os.cpu_count(),
    }

    def call(subject: Subject, index: int, record: bool) -> np.ndarray:
        timed, timer = _timed(subject.components)
        start = time.perf_counter()
        images = generate(
            timed,
            chunks[index],
            num_inference_steps=subject.num_inference_steps,
            guidance_scale=subject.guidance_scale,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(seed + index),
            num_images_per_prompt=num_images_per_prompt,
            output_type="np",
            timesteps=subject.timesteps,
            feature_cache=feature_cache,
        )
        total = time.perf_counter() - start
        if record:
            timer["total"] = total
            timer["other"] = total - timer["text_encoder"] - timer["unet"] - timer["vae_decoder"]
            timer["images"] = len(images)
            timer["chunk"] = index
            subject.calls.append(timer)
        return images

    try:
        for _ in range(warmup):
            for index in range(len(chunks)):
                for subject in subjects:
                    call(subject, index, record=False)
        for repeat in range(repeats):
            for index in range(len(chunks)):  # rounds: every subject once per chunk, so drift hits them alike
                for subject in subjects:
                    images = call(subject, index, record=True)
                    if repeat == 0:
                        subject.images = images if index == 0 else np.concatenate([subject.images, images])
    except (ValueError, TypeError) as exc:  # the sampling loop's argument checks (as the runtime maps them)
        raise ConfigError((str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None
    settings["load_average"] = {"start": load_at_start, "end": _load_average()}

    quality: dict[str, float] = {}
    if len(subjects) == 2:
        reference, estimate = subjects[1].images, subjects[0].images
        from sdcompiler.passes.teacher_data import psnr_db

        quality["psnr_db"] = psnr_db(reference, estimate)
        quality["ssim"] = ssim(reference, estimate)
    if scorer is not None:
        for subject in subjects:
            quality[f"clip_score_{subject.name}"] = scorer.score(subject.images, prompts, num_images_per_prompt)
    judge = _judge(subjects, prompts, num_images_per_prompt, quality) if judged else None
    report = BenchReport(settings, subjects, quality, judge)
    noise = report.timing_warnings()
    if noise:
        warnings.warn("; ".join(noise), NoisyTimingWarning, stacklevel=2)
    return report


def _judge(subjects: list[Subject], prompts: list[str], per_prompt: int, quality: dict[str, float]) -> dict[str, Any]:
    """The digits judge's prompt accuracy per subject, added to `quality`; its record for the report."""
    from sdcompiler import digits

    named = [digits.digit_of_prompt(p) for p in prompts]
    unnamed = [p for p, d in zip(prompts, named) if d is None]
    record: dict[str, Any] = {"model": "digits-sd15", "classifier": "sdcompiler.digits (SVC on held-out real digits)"}
    if unnamed:
        record["unavailable"] = (
            f"prompt {unnamed[0]!r} names no digit (or several); the judge needs prompts that each name one "
            "digit, e.g. 'a handwritten digit seven' (or no prompts: the judge's own)"
        )
        return record
    expected = [d for d in named for _ in range(per_prompt)]
    try:
        scores = [digits.prompt_accuracy(subject.images, expected) for subject in subjects]
    except ImportError as exc:  # scikit-learn, the digits extra: the timings still stand
        record["unavailable"] = str(exc)
        return record
    record.update(images=len(expected), standard_error={})
    for subject, (accuracy, error) in zip(subjects, scores):
        quality[f"prompt_accuracy_{subject.name}"] = accuracy
        record["standard_error"][subject.name] = error
    return record


def _judge_line(judge: dict[str, Any]) -> str:
    if "unavailable" in judge:
        return f"digits judge: prompt accuracy not available: {judge['unavailable']}"
    parts = [f"{name} {100 * error:.0f}" for name, error in judge["standard_error"].items()]
    return (
        f"digits judge ({judge['classifier']}): prompt accuracy is the share of {judge['images']} images per "
        f"subject read as their prompt's digit (standard error in points: {', '.join(parts)})"
    )


def _subject(
    name: str,
    what,
    device: str,
    allow_pickle: bool,
    steps: int | None,
    guidance: float | None,
    macs_resolution: tuple[int, int] | None = None,
    options: dict[str, Any] | None = None,
    verify: bool = True,
) -> Subject:
    from sdcompiler.runtime import CompiledPipeline, load_compiled

    is_artifact = isinstance(what, CompiledPipeline) or (Path(str(what)) / "manifest.json").is_file()
    if options and not is_artifact:
        raise ConfigError(f"options apply to compiled artifacts, and {what} is a checkpoint; drop the options")
    if options and isinstance(what, CompiledPipeline):
        raise ConfigError(
            "options apply when the candidate is loaded here: pass the artifact folder, or load it "
            "with load_compiled(dir, options=...) yourself"
        )
    if not isinstance(what, CompiledPipeline) and is_artifact:
        what = load_compiled(what, device=device, options=options, verify=verify)
    if isinstance(what, CompiledPipeline):
        manifest = what.manifest
        defaults = manifest.get("defaults", {})
        passes = manifest["passes"]
        label = f"{manifest['arch']} {'+'.join(p['name'] for p in passes) or 'no passes'} -> {manifest['target']}"
        changed = {k: v for k, v in what.target_config.items() if manifest["lowering"]["config"].get(k) != v}
        if changed:
            label += " (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"
        last = passes[-1] if passes else None
        unet_params = last["params_after"] if last else None
        macs = last["macs_after"] if last else None
        unet = what.components.modules.get("unet")
        if last is None and unet is not None:  # no pass recorded the counts: count the torch module as loaded
            from sdcompiler.passes import count_macs, count_params

            unet_params = count_params(unet)
            macs = count_macs(unet, tuple(manifest["macs_resolution"]), what.components.vae_scale_factor)
        return Subject(
            name,
            label,
            what.components,
            num_inference_steps=defaults.get("num_inference_steps", 50) if steps is None else steps,
            guidance_scale=defaults.get("guidance_scale", 7.5) if guidance is None else guidance,
            timesteps=defaults.get("timesteps") if steps is None else None,
            disk_bytes=_disk_bytes(what.root),
            unet_params=unet_params,
            macs_per_unet_call=macs,
            macs_resolution=tuple(manifest["macs_resolution"]) if macs is not None else None,
        )
    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import count_macs, count_params
    from sdcompiler.targets.components import pipeline_components

    loaded = load_checkpoint(what, allow_pickle=allow_pickle)
    pipe = loaded.pipeline
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    macs_resolution = tuple(macs_resolution or (size, size))
    source = Path(loaded.source["path"])  # a Hugging Face id is not a path here: no size
    return Subject(
        name,
        f"{loaded.arch.name} checkpoint (diffusers, torch eager fp32)",
        pipeline_components(pipe, loaded.arch, device),
        num_inference_steps=50 if steps is None else steps,
        guidance_scale=loaded.arch.default_guidance_scale if guidance is None else guidance,
        disk_bytes=_disk_bytes(source) if source.exists() else None,
        unet_params=count_params(pipe.unet),
        macs_per_unet_call=count_macs(pipe.unet, macs_resolution, pipe.vae_scale_factor),
        macs_resolution=macs_resolution,
    )


def _timed(c: Components) -> tuple[Components, dict[str, float]]:
    """A copy of `c` whose callables add their wall time (and call counts) into the returned dict."""
    timer = {"text_encoder": 0.0, "unet": 0.0, "vae_decoder": 0.0, "unet_calls": 0, "shallow_calls": 0}

    def wrap(fn, stage: str, *counts: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            timer[stage] += time.perf_counter() - start
            for count in counts:
                timer[count] += 1
            return out

        return run

    cache = c.feature_cache
    if cache is not None:
        cache = dataclasses.replace(
            cache,
            full=wrap(cache.full, "unet", "unet_calls"),
            shallow=wrap(cache.shallow, "unet", "unet_calls", "shallow_calls"),
        )
    timed = dataclasses.replace(
        c,
        text_encoders=[wrap(e, "text_encoder") for e in c.text_encoders],
        unet=wrap(c.unet, "unet", "unet_calls"),
        decode=wrap(c.decode, "vae_decoder"),
        feature_cache=cache,
    )
    return timed, timer


def ssim(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean SSIM of (N, H, W, 3) images in [0, 1]: Gaussian window 11 (sigma 1.5; smaller for tiny images),
    per channel, valid positions only (Wang et al. 2004 constants)."""
    reference, estimate = np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    if reference.shape != estimate.shape or reference.ndim != 4:
        raise ConfigError(
            f"images to compare have shapes {reference.shape} and {estimate.shape}; pass two "
            "(N, H, W, C) arrays of one shape"
        )
    x = torch.from_numpy(reference).permute(0, 3, 1, 2)
    y = torch.from_numpy(estimate).permute(0, 3, 1, 2)
    size = min(11, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    channels = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


class _ClipScorer:
    """CLIP score (100 x max(cosine(image, text), 0), averaged) with a local transformers CLIP folder."""

    def __init__(self, path: str | Path, allow_pickle: bool):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(
                f"CLIP model folder {folder} does not exist; pass a local transformers CLIP folder "
                "(model weights + tokenizer + preprocessor config)"
            )
        if not any(folder.glob("*.safetensors")) and not allow_pickle:
            raise ConfigError(
                f"{folder} holds no .safetensors weights; convert them or pass allow_pickle "
                "(--allow-pickle) to load pickle weights (unpickling can run code)"
            )
        try:
            # use_safetensors=None: safetensors when present, else (allowed) pickle weights
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=None if allow_pickle else True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"cannot load the CLIP model in {folder}: {first}") from None

    def score(self, images: np.ndarray, prompts: list[str], per_prompt: int) -> float:
        texts = [p for p in prompts for _ in range(per_prompt)]
        pixels = [(im * 255).round().astype(np.uint8) for im in images]
        inputs = self.processor(text=texts, images=pixels, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text_embeds = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return float(100 * cosine.clamp(min=0).mean())


def _disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _needs(metric: str) -> str:
    if metric.startswith("prompt_accuracy"):
        return "compare with the digits model (make_checkpoint(size='digits')) on prompts that name one digit" + (
            " and pass a baseline" if metric.endswith("baseline") else ""
        )
    if metric.startswith("clip_score"):
        return "pass a CLIP model" + (" and a baseline" if metric.endswith("baseline") else "")
    return "pass a baseline"


def check_requirements_measurable(requirements: Sequence[Requirement], baseline: bool, clip: bool) -> None:
    """Refuse, before any timing, a requirement the run cannot measure."""
    for r in requirements:
        needs_baseline = r.metric in (
            "psnr_db",
            "ssim",
            "speedup",
            "unet_call_speedup",
            "clip_score_baseline",
            "prompt_accuracy_baseline",
        )
        if (needs_baseline and not baseline) or (r.metric.startswith("clip_score") and not clip):
            raise ConfigError(f"requirement {r} cannot be checked: {_needs(r.metric)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt_stats(s: dict[str, float]) -> str:
    return f"{s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g})"
