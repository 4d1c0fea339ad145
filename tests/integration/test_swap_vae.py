"""swap_vae / preset `taesd`: a tiny VAE (diffusers AutoencoderTiny) instead of the full one, checked against
diffusers' own pipelines built with the same tiny VAE (text-to-image and image-to-image, torch and onnx)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PassError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes.accounting import vae_decoder_macs

CALL = dict(num_inference_steps=3, output_type="np")


def _tiny_vae(folder, seed: int, latent_channels: int = 4):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        latent_channels=latent_channels,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return _tiny_vae(tmp_path_factory.mktemp("taesd") / "vae", seed=0)


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, taesd, tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd_artifacts")
    built = {}

    def get(arch: str, target: str):
        if (arch, target) not in built:
            built[arch, target] = compile_pipeline(
                tiny_checkpoint(arch),
                [{"preset": "taesd", "path": str(taesd)}],
                target,
                root / f"{arch}-{target}",
                show_progress=False,
            )
        return built[arch, target]

    return get


def _reference(checkpoint, taesd, arch: str, img2img: bool = False):
    import diffusers
    from diffusers import AutoencoderTiny

    name = ("StableDiffusionXL" if arch == "sdxl" else "StableDiffusion") + ("Img2Img" if img2img else "") + "Pipeline"
    components = load_checkpoint(checkpoint).pipeline.components | {"vae": AutoencoderTiny.from_pretrained(taesd)}
    if arch != "sdxl":
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("arch, target", [("sd15", "torch"), ("sd15", "onnx"), ("sdxl", "torch")])
def test_tiny_vae_pipeline_matches_diffusers(arch, target, artifacts, tiny_checkpoint, taesd):
    pipe = artifacts(arch, target)
    assert pipe.manifest["model"]["scaling_factor"] == 1.0  # TAESD scales latents itself
    got = pipe(["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **CALL).images
    want = _reference(tiny_checkpoint(arch), taesd, arch)(
        ["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **CALL
    ).images
    assert np.abs(got - want).max() < 1e-3 and got.std() > 0
    reloaded = load_compiled(pipe.root, device="cpu")  # the artifact alone rebuilds the tiny VAE
    if target == "torch":
        assert type(reloaded.components.modules["vae"]).__name__ == "AutoencoderTiny"
        assert json.loads((pipe.root / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    again = reloaded(["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(again - got).max() < 1e-5


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_tiny_vae_img2img_matches_diffusers(target, artifacts, tiny_checkpoint, taesd):
    pipe = artifacts("sd15", target)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    kwargs = dict(image=image, strength=0.7, **CALL)
    got = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    want = _reference(tiny_checkpoint("sd15"), taesd, "sd15", img2img=True)(
        "a cat", generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    assert np.abs(got - want).max() < 1e-3
    if target == "onnx":  # the tiny VAE's encoder gives latents, not a posterior: optimum's latent_sample output
        assert pipe.components.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8)


def test_metrics_count_the_vae(artifacts, tiny_checkpoint, taesd):
    from diffusers import AutoencoderTiny

    record = artifacts("sd15", "torch").manifest["passes"][0]
    assert record["name"] == "swap_vae"
    assert record["params_before"] == record["params_after"]  # the U-Net is untouched
    metrics = record["metrics"]
    full = load_checkpoint(tiny_checkpoint("sd15")).pipeline.vae
    tiny = AutoencoderTiny.from_pretrained(taesd)
    assert metrics["vae_params_before"] == sum(p.numel() for p in full.parameters())
    assert metrics["vae_params_after"] == sum(p.numel() for p in tiny.parameters())
    # decoder MACs: the convolutions at each resolution, counted independently from the layer shapes
    expected = 0
    hooks = []

    def count(module, inputs, output):
        nonlocal expected
        kernel = module.weight.shape
        expected += output.numel() * kernel[1] * kernel[2] * kernel[3]

    for module in tiny.decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        tiny.decode(torch.zeros(1, 4, 16, 16))
    for hook in hooks:
        hook.remove()
    assert metrics["vae_decoder_macs_after"] == expected == vae_decoder_macs(tiny, (128, 128), 8)
    assert metrics["vae_decoder_macs_before"] == vae_decoder_macs(full, (128, 128), 8) > 0


def test_runtime_loras_work_after_swap_vae(artifacts, tiny_checkpoint, tmp_path):
    from lora_files import make_full_lora

    pipe = load_compiled(artifacts("sd15", "torch").root, device="cpu")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    pipe.set_loras([make_full_lora(tiny_checkpoint("sd15"), tmp_path / "l", seed=1)])
    assert np.abs(pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images - base).max() > 0


def test_bad_tiny_vae_folders(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("sd15")

    def compile_with(path):
        return compile_pipeline(
            ckpt, [{"preset": "taesd", "path": str(path)}], "torch", tmp_path / "out", show_progress=False
        )

    with pytest.raises(PassError, match="needs 'path'"):
        compile_pipeline(ckpt, "taesd", "torch", tmp_path / "out", show_progress=False)
    with pytest.raises(PassError, match="does not exist; pass a local diffusers AutoencoderTiny folder"):
        compile_with(tmp_path / "missing")
    with pytest.raises(PassError, match="not an AutoencoderTiny"):
        compile_with(ckpt / "vae")  # the full VAE
    with pytest.raises(PassError, match="8 latent channels"):
        compile_with(_tiny_vae(tmp_path / "wide", seed=1, latent_channels=8))
    pickled = _tiny_vae(tmp_path / "pickled", seed=2)
    for file in pickled.glob("*.safetensors"):
        file.unlink()
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PassError, match="no .safetensors weights"):
        compile_with(pickled)
    assert not (tmp_path / "out").exists()  # nothing half-written
    config = json.loads((pickled / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"


def _fake_hub_cache(root, repo_id: str, source):
    """The part of huggingface_hub's cache layout a local-only lookup reads: refs/main -> snapshots/<commit>/."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_cached_hub_id_is_a_tiny_vae(tiny_checkpoint, taesd, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/taesd", taesd)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    pipe = compile_pipeline(
        tiny_checkpoint("sd15"),
        {"preset": "taesd", "path": "someone/taesd"},
        "torch",
        tmp_path / "out",
        show_progress=False,
    )
    assert type(pipe.components.modules["vae"]).__name__ == "AutoencoderTiny"
    assert pipe.manifest["recipe"]["passes"][0]["path"] == "someone/taesd"  # the recipe replays by id
    with pytest.raises(PassError) as info:
        compile_pipeline(
            tiny_checkpoint("sd15"),
            {"preset": "taesd", "path": "someone/absent"},
            "torch",
            tmp_path / "out2",
            show_progress=False,
        )
    message = str(info.value)
    assert "someone/absent is neither a local folder nor a Hugging Face id in the local cache" in message
    assert "local diffusers AutoencoderTiny folder" in message and "madebyollin/taesd" in message
    assert not (tmp_path / "out2").exists()
