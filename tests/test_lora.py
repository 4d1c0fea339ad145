"""merge_lora: diffusers/peft and kohya LoRA files fused into the weights, per-LoRA scales, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcompiler import compile_pipeline
from sdcompiler.errors import PassError, RecipeError
from sdcompiler.loading import load_checkpoint

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CALL = dict(num_inference_steps=2, output_type="np")


def _make_lora(checkpoint: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A random (non-zero) diffusers-format LoRA for the U-Net, saved as diffusers saves them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load_checkpoint(checkpoint).pipeline.unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def _to_kohya(file: Path, out: Path) -> Path:
    """The same LoRA in the kohya / A1111 key layout (lora_unet_*.lora_down/lora_up/alpha)."""
    state = load_file(str(file))
    kohya = {}
    for key, value in state.items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        if kind.startswith("A"):
            kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    save_file(kohya, str(out))
    return out


def _reference(checkpoint: Path, loras: list[tuple[Path, float]]):
    pipe = load_checkpoint(checkpoint).pipeline
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    return pipe


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    first = _make_lora(tiny_checkpoint("sd15"), root / "a", seed=1)
    second = _make_lora(tiny_checkpoint("sd15"), root / "b", seed=2, rank=8)
    return {"a": first, "b": second, "kohya": _to_kohya(first, root / "a_kohya.safetensors")}


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_merged_lora_matches_diffusers_lora_pipeline(target, tiny_checkpoint, lora_files, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    compiled = compile_pipeline(ckpt, [{"pass": "merge_lora", "path": str(lora_files["a"]), "scale": 0.7}], target,
                                tmp_path / "out", show_progress=False)
    assert compiled.manifest["passes"][0]["metrics"]["unet_lora_layers"] > 0
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    want = _reference(ckpt, [(lora_files["a"], 0.7)])("a cat", generator=torch.Generator().manual_seed(0),
                                                       **CALL).images
    base = load_checkpoint(ckpt).pipeline("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - base).max() > 1e-2  # the LoRA changed the model


def test_kohya_layout_gives_the_same_model(tiny_checkpoint, lora_files, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    images = []
    for name in ("a", "kohya"):
        pipe = compile_pipeline(ckpt, [{"pass": "merge_lora", "path": str(lora_files[name])}], "torch",
                                tmp_path / name, show_progress=False)
        images.append(pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images)
    assert np.abs(images[0] - images[1]).max() < 1e-4


def test_several_loras_with_their_own_scales(tiny_checkpoint, lora_files, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    loras = [(lora_files["a"], 0.5), (lora_files["b"], 1.2)]  # ranks 4 and 8
    recipe = [{"pass": "merge_lora", "loras": [{"path": str(p), "scale": s} for p, s in loras]}]
    compiled = compile_pipeline(ckpt, recipe, "torch", tmp_path / "out", show_progress=False)
    assert compiled.manifest["passes"][0]["metrics"]["loras"] == 2
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    want = _reference(ckpt, loras)("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(got - want).max() < 1e-3


def test_lora_for_another_architecture_is_refused(tiny_checkpoint, lora_files, tmp_path):
    with pytest.raises(PassError, match="another architecture|does not fit"):
        compile_pipeline(tiny_checkpoint("sdxl"), [{"pass": "merge_lora", "path": str(lora_files["a"])}], "torch",
                         tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_lora_inputs(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    with pytest.raises(PassError, match="does not exist"):
        compile_pipeline(ckpt, [{"pass": "merge_lora", "path": str(tmp_path / "none.safetensors")}], "torch",
                         tmp_path / "o1", show_progress=False)
    pickle = tmp_path / "lora.bin"
    torch.save({}, pickle)
    with pytest.raises(PassError, match="not .safetensors"):
        compile_pipeline(ckpt, [{"pass": "merge_lora", "path": str(pickle)}], "torch", tmp_path / "o2",
                         show_progress=False)
    with pytest.raises(PassError, match="needs 'path' or 'loras'"):
        compile_pipeline(ckpt, [{"pass": "merge_lora"}], "torch", tmp_path / "o3", show_progress=False)


def test_lora_merge_must_come_before_structural_passes(tiny_checkpoint, lora_files, tmp_path):
    recipe = ["bk-small", {"pass": "merge_lora", "path": str(lora_files["a"])}]
    with pytest.raises(RecipeError, match="'merge_lora' .* must come before pass 'prune_blocks'"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", show_progress=False)


def test_lcm_lora_composite_preset(tiny_checkpoint, lora_files, tmp_path):
    """{preset: lcm-lora, path}: two records (merge + scheduler), 4 steps / guidance 1 by default, like diffusers."""
    from diffusers import LCMScheduler

    ckpt = tiny_checkpoint("sd15")
    compiled = compile_pipeline(ckpt, [{"preset": "lcm-lora", "path": str(lora_files["a"])}], "onnx",
                                tmp_path / "out", show_progress=False)
    assert [r["name"] for r in compiled.manifest["passes"]] == ["merge_lora", "set_scheduler"]
    assert compiled.manifest["defaults"]["num_inference_steps"] == 4
    assert compiled.manifest["defaults"]["guidance_scale"] == 1.0
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    reference = _reference(ckpt, [(lora_files["a"], 1.0)])
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config, original_inference_steps=50)
    want = reference("a cat", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    assert np.abs(got - want).max() < 1e-3
