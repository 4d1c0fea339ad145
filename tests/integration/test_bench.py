"""`sdcompiler bench` / `sdcompiler.benchmark`: per-stage timing against a baseline, PSNR / SSIM, CLIP score.

Every subject runs real tiny components (no mocks). Counts that the report
records (U-Net calls, shallow calls, steps) are checked against values
computed independently here from the scheduler configs and the feature-cache
plan; quality numbers are checked against independent computations.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdcompiler
from sdcompiler.bench import benchmark, ssim
from sdcompiler.cli import main
from sdcompiler.errors import ConfigError
from sdcompiler.passes.feature_cache import CacheSettings, full_steps

STEPS = 2
PROMPTS = ["a red cube on a wooden table", "a photo of a cat"]


# ---------------------------------------------------------------- helpers / fixtures


def _num_timesteps(folder: Path, steps: int) -> int:
    """How many U-Net calls (one per timestep) the folder's own scheduler makes for `steps`, via diffusers."""
    import diffusers

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(1 / mse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("sd15")


@pytest.fixture(scope="module")
def artifacts(ckpt, tmp_path_factory):
    """Factory: (recipe, target) -> artifact folder, compiled once per module."""
    from sdcompiler import compile_pipeline

    root = tmp_path_factory.mktemp("bench_artifacts")
    built: dict[tuple[str, str], Path] = {}

    def get(recipe: str, target: str = "torch") -> Path:
        if (recipe, target) not in built:
            out = root / f"{recipe}-{target}"
            compile_pipeline(ckpt, recipe=recipe, target=target, output_dir=out, device="cpu")
            built[recipe, target] = out
        return built[recipe, target]

    return get


@pytest.fixture(scope="module")
def same_model_report(artifacts, ckpt):
    """A recipe-"none" torch artifact against its own source checkpoint: 2 timed calls each."""
    return benchmark(artifacts("none"), ckpt, num_inference_steps=STEPS, repeats=2, warmup=0, device="cpu")


# ---------------------------------------------------------------- 1. artifact vs its own checkpoint


def test_public_entry_point_is_the_bench_function():
    assert sdcompiler.benchmark is benchmark
    assert "benchmark" in sdcompiler.__all__


def test_same_model_images_are_identical(same_model_report):
    report = same_model_report
    cand, base = report.subjects
    assert (cand.name, base.name) == ("candidate", "baseline")
    assert cand.images.shape == base.images.shape == (1, 128, 128, 3)  # tiny SD1.5 default size
    assert cand.images.dtype == base.images.dtype
    assert np.array_equal(cand.images, base.images)
    assert 0 <= cand.images.min() and cand.images.max() <= 1 and cand.images.std() > 0
    assert report.quality["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert report.quality["psnr_db"] >= 150
    assert set(report.quality) == {"psnr_db", "ssim"}  # no CLIP model given


def test_same_model_report_structure(same_model_report, ckpt):
    report = same_model_report
    data = report.to_dict()
    json.dumps(data)  # serializable as is
    assert set(data["subjects"]) == {"candidate", "baseline"}
    assert data["settings"]["repeats"] == 2 and data["settings"]["warmup"] == 0
    assert data["settings"]["images_per_call"] == 1
    assert (data["settings"]["height"], data["settings"]["width"]) == (128, 128)
    expected_calls = _num_timesteps(ckpt, STEPS)  # PNDM: steps + 1
    assert expected_calls == STEPS + 1

    for subject in report.subjects:
        summary = data["subjects"][subject.name]
        assert len(subject.calls) == 2
        assert summary["num_inference_steps"] == STEPS and summary["guidance_scale"] == 7.5
        totals = [c["total"] for c in subject.calls]
        assert summary["seconds_per_call"] == {
            "median": statistics.median(totals),
            "min": min(totals),
            "max": max(totals),
            "n": 2,
        }
        assert summary["seconds_per_call"]["median"] > 0
        assert summary["seconds_per_image"] == pytest.approx(statistics.median(totals))
        assert summary["images_per_second"] == pytest.approx(1 / statistics.median(totals))
        for call in subject.calls:
            assert call["text_encoder"] > 0 and call["unet"] > 0 and call["vae_decoder"] > 0
            assert call["other"] >= 0
            assert call["text_encoder"] + call["unet"] + call["vae_decoder"] <= call["total"] + 1e-9
            assert call["unet_calls"] == expected_calls and call["shallow_calls"] == 0
        stages = summary["stages_seconds"]
        assert set(stages) == {"text_encoder", "unet", "vae_decoder", "other"}
        assert all(v >= 0 for v in stages.values())
        assert stages["text_encoder"] + stages["unet"] + stages["vae_decoder"] <= (
            summary["seconds_per_call"]["median"] + 1e-9
        )
        assert summary["unet_calls"] == expected_calls and summary["shallow_unet_calls"] == 0
        assert summary["seconds_per_unet_call"] == pytest.approx(
            statistics.median(c["unet"] / expected_calls for c in subject.calls)
        )
        assert summary["disk_bytes"] > 0

    cand, base = data["subjects"]["candidate"], data["subjects"]["baseline"]
    assert data["speedup"] > 0
    assert data["speedup"] == pytest.approx(base["seconds_per_call"]["median"] / cand["seconds_per_call"]["median"])
    assert data["unet_call_speedup"] == pytest.approx(base["seconds_per_unet_call"] / cand["seconds_per_unet_call"])
    assert "torch" in cand["label"] and "checkpoint" in base["label"]
    # the baseline's model facts come from the checkpoint itself
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(ckpt / "unet")
    assert base["unet_params"] == sum(p.numel() for p in unet.parameters())
    assert base["macs_per_unet_call"] > 0 and tuple(base["macs_resolution"]) == (128, 128)


def test_same_model_reports_equal_unet_params_and_macs(same_model_report):
    subjects = same_model_report.to_dict()["subjects"]
    cand, base = subjects["candidate"], subjects["baseline"]
    assert cand.get("unet_params") == base["unet_params"]
    assert cand.get("macs_per_unet_call") == base["macs_per_unet_call"]


def test_markdown_table(same_model_report, ckpt):
    text = same_model_report.markdown()
    n = _num_timesteps(ckpt, STEPS)
    assert text.startswith("sdcompiler bench: 1 image(s) per call at 128x128, device cpu, 0 warm-up + 2 timed")
    assert "| | candidate | baseline |" in text
    assert f"| steps / guidance | {STEPS} / 7.5 | {STEPS} / 7.5 |" in text
    assert f"| U-Net calls per call (shallow) | {n} (0) | {n} (0) |" in text
    assert "speed-up (baseline / candidate, medians):" in text
    assert "quality: psnr_db 200, ssim 1" in text
    header = [line for line in text.splitlines() if line.startswith("| |")][0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.count("|") == header.count("|") for line in rows)  # every row has one cell per subject


def test_without_baseline_no_speedup_or_quality(artifacts):
    report = benchmark(
        artifacts("none"),
        num_inference_steps=1,
        repeats=1,
        warmup=1,
        height=64,
        width=64,
        prompts=PROMPTS,
        num_images_per_prompt=2,
    )
    data = report.to_dict()
    assert list(data["subjects"]) == ["candidate"]
    assert "speedup" not in data and "unet_call_speedup" not in data
    assert report.quality == {}
    assert data["settings"]["images_per_call"] == 4
    assert report.subjects[0].images.shape == (4, 64, 64, 3)
    assert data["subjects"]["candidate"]["seconds_per_image"] == pytest.approx(
        data["subjects"]["candidate"]["seconds_per_call"]["median"] / 4
    )
    assert len(report.subjects[0].calls) == 1  # warm-up calls are not recorded
    text = report.markdown()
    assert "speed-up" not in text and "quality:" not in text and "| | candidate |" in text


# ---------------------------------------------------------------- 2. a structurally different candidate


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_pruned_candidate_differs_from_checkpoint(artifacts, ckpt, target):
    folder = artifacts("bk-small", target)
    report = benchmark(folder, ckpt, num_inference_steps=STEPS, repeats=1, warmup=0)
    cand, base = report.subjects
    psnr, value = report.quality["psnr_db"], report.quality["ssim"]
    assert math.isfinite(psnr) and psnr < 100
    assert psnr == pytest.approx(_psnr(base.images, cand.images), rel=1e-9)
    assert 0 < value < 1
    assert value == pytest.approx(ssim(base.images, cand.images), abs=1e-12)
    data = report.to_dict()["subjects"]
    assert 0 < data["candidate"]["unet_params"] < data["baseline"]["unet_params"]
    assert 0 < data["candidate"]["macs_per_unet_call"] < data["baseline"]["macs_per_unet_call"]
    assert data["candidate"]["macs_resolution"] == data["baseline"]["macs_resolution"] == (128, 128)
    assert "prune_blocks" in data["candidate"]["label"] and target in data["candidate"]["label"]
    n = _num_timesteps(ckpt, STEPS)
    assert data["candidate"]["unet_calls"] == data["baseline"]["unet_calls"] == n
    if target == "torch":  # the recorded count is the pruned U-Net's real size
        pipe = sdcompiler.load_compiled(folder, device="cpu")
        assert data["candidate"]["unet_params"] == sum(p.numel() for p in pipe.components.modules["unet"].parameters())


# ---------------------------------------------------------------- 3. feature cache


def test_deepcache_counts_full_and_shallow_calls(artifacts, ckpt):
    folder = artifacts("deepcache")
    pipe = sdcompiler.load_compiled(folder, device="cpu")  # a CompiledPipeline works as well as a folder
    settings = CacheSettings.from_dict(pipe.manifest["defaults"]["feature_cache"])
    steps = 4
    n = _num_timesteps(folder, steps)
    plan = full_steps(n, settings)
    shallow = plan.count(False)
    assert shallow > 0  # the check below means something

    cached = benchmark(pipe, ckpt, num_inference_steps=steps, repeats=1, warmup=0, height=64, width=64)
    summary = cached.to_dict()["subjects"]["candidate"]
    assert summary["unet_calls"] == n and summary["shallow_unet_calls"] == shallow
    assert cached.to_dict()["subjects"]["baseline"]["shallow_unet_calls"] == 0
    assert f"| U-Net calls per call (shallow) | {n} ({shallow}) | {n} (0) |" in cached.markdown()
    # shallow steps approximate the full U-Net: close to, but not exactly, the checkpoint's images
    assert 0 < cached.quality["ssim"] < 1 and cached.quality["psnr_db"] < 150

    uncached = benchmark(
        pipe, ckpt, num_inference_steps=steps, repeats=1, warmup=0, height=64, width=64, feature_cache=False
    )
    summary = uncached.to_dict()["subjects"]["candidate"]
    assert summary["unet_calls"] == n and summary["shallow_unet_calls"] == 0
    assert uncached.settings["feature_cache"] is False
    # without the cache the torch target runs the checkpoint's exact computation
    assert uncached.quality["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert np.array_equal(uncached.subjects[0].images, uncached.subjects[1].images)


# ---------------------------------------------------------------- 4. per-subject defaults


def test_each_subject_runs_its_own_default_steps_and_guidance(artifacts, ckpt):
    folder = artifacts("lcm-scheduler")
    defaults = json.loads((folder / "manifest.json").read_text())["defaults"]
    assert defaults["num_inference_steps"] == 4 and defaults["guidance_scale"] == 1.0
    report = benchmark(folder, ckpt, num_inference_steps=None, repeats=1, warmup=0, height=64, width=64)
    data = report.to_dict()["subjects"]
    cand, base = data["candidate"], data["baseline"]
    assert (cand["num_inference_steps"], cand["guidance_scale"]) == (4, 1.0)
    assert (base["num_inference_steps"], base["guidance_scale"]) == (50, 7.5)
    assert cand["unet_calls"] == _num_timesteps(folder, 4) == 4
    assert base["unet_calls"] == _num_timesteps(ckpt, 50) == 51  # PNDM
    assert report.subjects[0].images.shape == report.subjects[1].images.shape == (1, 64, 64, 3)
    assert "| steps / guidance | 4 / 1 | 50 / 7.5 |" in report.markdown()
    # an explicit step count / guidance overrides both subjects' defaults
    report = benchmark(
        folder, ckpt, num_inference_steps=1, guidance_scale=2.0, repeats=1, warmup=0, height=64, width=64
    )
    data = report.to_dict()["subjects"]
    for name, folder_ in (("candidate", folder), ("baseline", ckpt)):
        assert (data[name]["num_inference_steps"], data[name]["guidance_scale"]) == (1, 2.0)
        assert data[name]["unet_calls"] == _num_timesteps(folder_, 1)


def test_recorded_timesteps_are_used_unless_steps_are_given(ckpt, tmp_path):
    import diffusers

    from sdcompiler import compile_pipeline

    recorded = [999, 599, 199]  # on LCM's 50-step grid, unlike LCMScheduler's own 3-step schedule
    recipe = [
        {
            "pass": "set_scheduler",
            "scheduler": "LCMScheduler",
            "options": {"original_inference_steps": 50},
            "timesteps": recorded,
            "guidance_scale": 1.0,
        }
    ]
    pipe = compile_pipeline(ckpt, recipe=recipe, target="torch", output_dir=tmp_path / "art", device="cpu")
    seen: list[int] = []
    unet = pipe.components.unet

    def spy(sample, timestep, *args):  # the real U-Net, recording the timestep of each call
        seen.append(int(timestep))
        return unet(sample, timestep, *args)

    pipe.components.unet = spy
    report = benchmark(pipe, num_inference_steps=None, repeats=1, warmup=0, height=64, width=64)
    assert seen == recorded
    summary = report.to_dict()["subjects"]["candidate"]
    assert (summary["num_inference_steps"], summary["unet_calls"], summary["guidance_scale"]) == (3, 3, 1.0)

    seen.clear()
    benchmark(pipe, num_inference_steps=2, repeats=1, warmup=0, height=64, width=64)
    scheduler = diffusers.LCMScheduler.from_pretrained(pipe.root, subfolder="scheduler")
    scheduler.set_timesteps(2)
    assert seen == [int(t) for t in scheduler.timesteps] and seen != recorded[:2]


# ---------------------------------------------------------------- 5. SSIM


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Straightforward per-window SSIM (Gaussian window, sigma 1.5, valid positions, per channel, mean)."""
    n, h, w, ch = x.shape
    size = min(11, h, w)
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for b in range(n):
        for c in range(ch):
            for i in range(h - size + 1):
                for j in range(w - size + 1):
                    px, py = x[b, i : i + size, j : j + size, c], y[b, i : i + size, j : j + size, c]
                    mx, my = (win * px).sum(), (win * py).sum()
                    vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
                    cov = (win * (px - mx) * (py - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_identity_symmetry_and_noise():
    rng = np.random.default_rng(0)
    x = rng.random((2, 24, 20, 3))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    z = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
    assert 0 < ssim(x, z) < ssim(x, y) < 1
    assert ssim(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(ssim(x, y), abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 14, 13, 3), (2, 7, 9, 3)])  # the second is smaller than the window
def test_ssim_matches_a_direct_computation(shape):
    rng = np.random.default_rng(1)
    x = rng.random(shape)
    y = np.clip(0.7 * x + 0.3 * rng.random(shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_reference_ssim(x, y), abs=1e-10)


@pytest.mark.parametrize("a, b", [(0.3, 0.7), (0.0, 1.0), (0.5, 0.5), (0.9, 0.2)])
def test_ssim_of_constant_images_is_closed_form(a, b):
    x = np.full((2, 16, 16, 3), a)
    y = np.full((2, 16, 16, 3), b)
    c1 = 0.01**2
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), abs=1e-9)


def test_ssim_refuses_mismatched_shapes():
    with pytest.raises(ConfigError, match="shapes"):
        ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 8, 3)))
    with pytest.raises(ConfigError):
        ssim(np.zeros((1, 16, 16, 3)), np.zeros((2, 16, 16, 3)))
    with pytest.raises(ConfigError, match=r"\(16, 16, 3\)"):  # one image without its batch axis
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)))


# ---------------------------------------------------------------- 6. CLIP score


def _clip_parts(ckpt: Path, seed: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ckpt / "tokenizer")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)  # seed 2: positive cosines on the images below; seed 0: negative ones
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    return model, processor


@pytest.fixture(scope="module")
def clip_folders(ckpt, tmp_path_factory):
    """(safetensors folder, pickle-only folder, safetensors folder of another seed): tiny random CLIPs and their
    processor; the first two hold the same weights."""
    model, processor = _clip_parts(ckpt, seed=2)
    root = tmp_path_factory.mktemp("clip")
    safe, pickled, negative = root / "safetensors", root / "pickle", root / "negative"
    model.save_pretrained(safe)
    processor.save_pretrained(safe)
    model.save_pretrained(pickled, safe_serialization=False)
    processor.save_pretrained(pickled)
    assert (safe / "model.safetensors").is_file() and not list(pickled.glob("*.safetensors"))
    assert (pickled / "pytorch_model.bin").is_file()
    model, processor = _clip_parts(ckpt, seed=0)
    model.save_pretrained(negative)
    processor.save_pretrained(negative)
    return safe, pickled, negative


def _independent_clip_score(folder: Path, images: np.ndarray, texts: list[str], clamp: bool = True) -> float:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    pil = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
    inputs = processor(text=texts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)  # image_embeds / text_embeds are unit-normalized projections
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    return float(100 * (cosine.clamp(min=0) if clamp else cosine).mean())


@pytest.fixture(scope="module")
def clip_report(artifacts, ckpt, clip_folders):
    return benchmark(
        artifacts("bk-small"),
        ckpt,
        prompts=PROMPTS,
        num_inference_steps=STEPS,
        repeats=1,
        warmup=0,
        height=64,
        width=64,
        clip_model=clip_folders[0],
    )


def test_clip_scores_per_subject(clip_report, clip_folders):
    report = clip_report
    assert set(report.quality) == {"psnr_db", "ssim", "clip_score_candidate", "clip_score_baseline"}
    for subject in report.subjects:
        score = report.quality[f"clip_score_{subject.name}"]
        assert 0 <= score <= 100
        assert score == pytest.approx(_independent_clip_score(clip_folders[0], subject.images, PROMPTS), abs=1e-4)
    assert report.quality["clip_score_baseline"] > 0  # seed chosen so the comparison is not 0 == 0
    assert report.quality["clip_score_candidate"] != report.quality["clip_score_baseline"]
    assert "clip_score_candidate" in report.markdown()


def test_clip_score_without_baseline_and_several_images_per_prompt(artifacts, clip_folders):
    report = benchmark(
        artifacts("none"),
        prompts=PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=1,
        repeats=1,
        warmup=0,
        height=64,
        width=64,
        clip_model=clip_folders[0],
    )
    assert set(report.quality) == {"clip_score_candidate"}
    images = report.subjects[0].images
    assert images.shape == (4, 64, 64, 3)
    texts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # images come prompt by prompt
    assert report.quality["clip_score_candidate"] == pytest.approx(
        _independent_clip_score(clip_folders[0], images, texts), abs=1e-4
    )


def test_negative_cosines_count_as_zero(artifacts, clip_folders):
    report = benchmark(
        artifacts("none"),
        prompts=PROMPTS,
        num_inference_steps=STEPS,
        repeats=1,
        warmup=0,
        height=64,
        width=64,
        clip_model=clip_folders[2],
    )
    images = report.subjects[0].images
    assert _independent_clip_score(clip_folders[2], images, PROMPTS, clamp=False) < 0  # this model disagrees
    assert report.quality["clip_score_candidate"] == 0.0


def test_pickle_clip_folder_is_refused_before_any_pipeline_runs(clip_folders, tmp_path):
    # the candidate does not exist: a refusal that mentions allow_pickle came before loading any subject
    with pytest.raises(ConfigError, match="allow_pickle") as info:
        benchmark(tmp_path / "no-such-artifact", clip_model=clip_folders[1], repeats=1, warmup=0)
    assert "\n" not in str(info.value)


def test_pickle_clip_folder_loads_with_allow_pickle(artifacts, clip_folders, clip_report):
    report = benchmark(
        artifacts("none"),
        prompts=PROMPTS,
        num_inference_steps=STEPS,
        repeats=1,
        warmup=0,
        height=64,
        width=64,
        clip_model=clip_folders[1],
        allow_pickle=True,
    )
    # the same weights as the safetensors folder, and the none artifact's images are the checkpoint's
    assert report.quality["clip_score_candidate"] == pytest.approx(clip_report.quality["clip_score_baseline"], abs=1e-4)


def test_allow_pickle_still_loads_a_safetensors_clip_folder(artifacts, clip_folders):
    report = benchmark(
        artifacts("none"),
        prompts=PROMPTS[:1],
        num_inference_steps=1,
        repeats=1,
        warmup=0,
        height=64,
        width=64,
        clip_model=clip_folders[0],
        allow_pickle=True,
    )
    assert "clip_score_candidate" in report.quality


def test_missing_clip_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        benchmark(tmp_path / "no-such-artifact", clip_model=tmp_path / "no-clip")


# ---------------------------------------------------------------- 7. bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, "repeats"),
        ({"repeats": -2}, "repeats"),
        ({"repeats": 1.5}, "repeats"),
        ({"repeats": True}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_counts_are_refused(artifacts, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        benchmark(artifacts("none"), **{"repeats": 1, "warmup": 0, **kwargs})


@pytest.mark.parametrize("kwargs", [{"height": 60}, {"width": 100}, {"height": 0}, {"num_inference_steps": 0}])
def test_bad_sampling_settings_are_one_line_config_errors(artifacts, ckpt, kwargs):
    with pytest.raises(ConfigError) as info:
        benchmark(artifacts("none"), ckpt, repeats=1, warmup=0, **{"num_inference_steps": 1, **kwargs})
    assert "\n" not in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


def test_sdxl_baseline_for_sd15_candidate_is_refused(artifacts, tiny_checkpoint):
    with pytest.raises(ConfigError, match="different model families"):
        benchmark(artifacts("none"), tiny_checkpoint("sdxl"), num_inference_steps=1, repeats=1, warmup=0)


# ---------------------------------------------------------------- 8. CLI


def test_cli_bench_writes_report_files_and_images(artifacts, ckpt, same_model_report, tmp_path, capsys):
    j, m, d = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "images"
    rc = main(
        [
            "bench",
            str(artifacts("none")),
            "--baseline",
            str(ckpt),
            "--steps",
            str(STEPS),
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--json",
            str(j),
            "--markdown",
            str(m),
            "--images",
            str(d),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "| | candidate | baseline |" in out
    assert m.read_text() == out

    data = json.loads(j.read_text())
    expected = same_model_report.to_dict()
    assert set(data) == set(expected)
    assert set(data["subjects"]) == {"candidate", "baseline"}
    for name in ("candidate", "baseline"):
        assert set(data["subjects"][name]) == set(expected["subjects"][name])
        assert data["subjects"][name]["seconds_per_call"]["n"] == 1
        assert data["subjects"][name]["unet_calls"] == _num_timesteps(ckpt, STEPS)
    assert data["settings"]["repeats"] == 1 and data["settings"]["warmup"] == 0
    assert data["quality"]["ssim"] == pytest.approx(1.0, abs=1e-9)

    assert sorted(p.name for p in d.iterdir()) == ["baseline-0.png", "candidate-0.png"]
    pixels = {}
    for name in ("candidate", "baseline"):
        with Image.open(d / f"{name}-0.png") as image:
            assert image.size == (128, 128) and image.mode == "RGB"
            pixels[name] = np.asarray(image)
    assert np.array_equal(pixels["candidate"], pixels["baseline"])
    expected_png = (same_model_report.subjects[0].images[0] * 255).round().astype(np.uint8)
    assert np.array_equal(pixels["candidate"], expected_png)  # same seed and steps as the API run


@pytest.mark.parametrize("extra", [["--repeats", "0"], ["--height", "60"]])
def test_cli_bench_bad_call_is_one_line_error(artifacts, ckpt, tmp_path, capsys, extra):
    j = tmp_path / "report.json"
    rc = main(
        [
            "bench",
            str(artifacts("none")),
            "--baseline",
            str(ckpt),
            "--steps",
            "1",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--quiet",
            "--json",
            str(j),
            *extra,
        ]
    )
    assert rc == 1
    err = _one_line_error(capsys)
    assert extra[0].lstrip("-") in err
    assert not j.exists()


def test_cli_bench_missing_artifact(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), "--repeats", "1", "--warmup", "0", "--quiet"]) == 1
    _one_line_error(capsys)


# ---------------------------------------------------------------- 9. prompt lists in chunks


def test_batch_size_runs_the_prompts_in_chunks(artifacts, ckpt):
    prompts = PROMPTS + ["a green bottle"]
    kwargs = dict(num_inference_steps=1, height=64, width=64, warmup=0, seed=3)
    report = benchmark(artifacts("none"), ckpt, prompts=prompts, repeats=2, batch_size=2, **kwargs)
    settings = report.to_dict()["settings"]
    assert settings["calls_per_repeat"] == 2 and settings["images_per_call"] == 2
    for subject in report.subjects:
        assert [c["images"] for c in subject.calls] == [2, 1, 2, 1]  # chunk by chunk, repeat by repeat
        assert subject.images.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(report.subjects[0].images, report.subjects[1].images)
    # chunk i runs with seed + i: the first chunk is the same call as a plain run over its prompts
    first = benchmark(artifacts("none"), prompts=prompts[:2], repeats=1, **kwargs)
    np.testing.assert_array_equal(first.subjects[0].images, report.subjects[0].images[:2])
    last = benchmark(artifacts("none"), prompts=prompts[2:], repeats=1, **(kwargs | {"seed": 4}))
    np.testing.assert_array_equal(last.subjects[0].images, report.subjects[0].images[2:])
    assert "2 x 2 calls" in report.markdown()


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_is_refused(artifacts, batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        benchmark(artifacts("none"), batch_size=batch_size, repeats=1, warmup=0)


def test_cli_bench_prompts_file(artifacts, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red cube\n\na blue sphere\na green bottle\n")
    report = tmp_path / "r.json"
    code = main(
        [
            "bench",
            str(artifacts("none")),
            "--prompts-file",
            str(prompts),
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    settings = json.loads(report.read_text())["settings"]
    assert settings["prompts"] == ["a red cube", "a blue sphere", "a green bottle"]
    assert settings["calls_per_repeat"] == 2
    assert main(["bench", str(artifacts("none")), "--prompts-file", str(tmp_path / "none.txt"), "--quiet"]) == 1
    assert "prompts file" in _one_line_error(capsys)


# ---------------------------------------------------------------- 10. requirements (CI gates)


def test_requirements_parse_and_refuse_bad_text():
    from sdcompiler.bench import Requirement

    assert Requirement.parse("psnr_db>=25") == Requirement("psnr_db", ">=", 25.0)
    assert Requirement.parse(" speedup > 1.5e0 ") == Requirement("speedup", ">", 1.5)
    assert Requirement.parse("seconds_per_image<.5") == Requirement("seconds_per_image", "<", 0.5)
    for bad in ("psnr_db=25", "psnr_db>=", "psnr>=25", ">=25", "ssim>=0.8x"):
        with pytest.raises(ConfigError):
            Requirement.parse(bad)


def test_report_check_compares_measured_values(same_model_report):
    report = same_model_report
    metrics = report.metrics()
    assert metrics["psnr_db"] == report.quality["psnr_db"] and metrics["speedup"] == report.to_dict()["speedup"]
    assert report.check(["psnr_db>=150", "ssim>0.999", "speedup>0"]) == []
    failures = report.check(["psnr_db<100", "speedup>=1e9", "clip_score_candidate>=20"])
    assert len(failures) == 3
    assert failures[0].startswith("psnr_db<100: measured 200")
    assert failures[1].startswith("speedup>=1e+09: measured")
    assert "was not measured" in failures[2] and "CLIP" in failures[2]


def test_cli_bench_require_gates_the_exit_status(artifacts, ckpt, tmp_path, capsys):
    j = tmp_path / "report.json"
    base = [
        "bench",
        str(artifacts("none")),
        "--baseline",
        str(ckpt),
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--quiet",
        "--json",
        str(j),
    ]
    assert main(base + ["--require", "psnr_db>=150", "--require", "ssim>0.99"]) == 0
    capsys.readouterr()
    j.unlink()
    assert main(base + ["--require", "ssim<0.5"]) == 1
    captured = capsys.readouterr()
    assert "| | candidate | baseline |" in captured.out  # the report still prints and saves
    assert j.is_file()
    err = captured.err.strip()
    assert err.startswith("error: 1 of 1 requirement(s) missed: ssim<0.5: measured 1") and "\n" not in err
    # a requirement the run cannot measure is refused before anything runs
    j.unlink()
    assert main(base[:2] + base[4:] + ["--require", "psnr_db>=20"]) == 1
    assert "pass a baseline" in _one_line_error(capsys)
    assert not j.exists()
