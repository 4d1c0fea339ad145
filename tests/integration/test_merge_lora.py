"""merge_lora: diffusers/peft and kohya LoRA files fused into the weights, per-LoRA scales, clear errors.

The oracle for the fusion is diffusers' own unfused LoRA path: the same file
given to `load_lora_weights` (adapter modules left in place, weighted with
`set_adapters`) must give the same U-Net and text-encoder outputs as the
model the pass fused, for a LoRA with random A and B in every key layout we
accept; whole compiled pipelines (onnx, torch) are compared with diffusers'
LoRA pipeline image for image.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lora_files import ENCODERS, hub_offline
from lora_files import make_full_lora as _make_full_lora
from lora_files import to_kohya as _to_kohya
from safetensors.torch import load_file

from sdcompiler import compile_pipeline
from sdcompiler.errors import PassError, RecipeError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import PassContext, PassManager
from sdcompiler.recipe import resolve_recipe

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
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


def _model_inputs(pipe, arch: str) -> dict:
    """Fixed random U-Net inputs and token ids for every text encoder."""
    generator = torch.Generator().manual_seed(0)
    unet = {
        "sample": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([999, 10]),
        "encoder_hidden_states": torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=generator),
    }
    if arch == "sdxl":
        unet["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=generator),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2),
        }
    tokens = {}
    for name in ENCODERS[arch]:
        tokenizer = pipe.tokenizer_2 if name == "text_encoder_2" else pipe.tokenizer
        tokens[name] = tokenizer(
            ["a cat", "a red cube"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
    return {"unet": unet, "tokens": tokens}


@torch.no_grad()
def _model_outputs(modules: dict, inputs: dict) -> dict[str, torch.Tensor]:
    outputs = {"unet": modules["unet"](**inputs["unet"]).sample}
    for name, ids in inputs["tokens"].items():
        outputs[name] = modules[name](ids).last_hidden_state
    return outputs


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
    """ "a": U-Net and text encoder (so a compile that fused only the U-Net's part fails the pipeline test); "b":
    U-Net only, rank 8."""
    root = tmp_path_factory.mktemp("loras")
    first = _make_full_lora(tiny_checkpoint("sd15"), root / "a", seed=1)
    second = _make_lora(tiny_checkpoint("sd15"), root / "b", seed=2, rank=8)
    return {"a": first, "b": second}


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_merged_lora_matches_diffusers_lora_pipeline(target, tiny_checkpoint, lora_files, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    compiled = compile_pipeline(
        ckpt,
        [{"pass": "merge_lora", "path": str(lora_files["a"]), "scale": 0.7}],
        target,
        tmp_path / "out",
        show_progress=False,
    )
    assert compiled.manifest["passes"][0]["metrics"]["unet_lora_layers"] > 0
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    want = _reference(ckpt, [(lora_files["a"], 0.7)])(
        "a cat", generator=torch.Generator().manual_seed(0), **CALL
    ).images
    base = load_checkpoint(ckpt).pipeline("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - base).max() > 1e-2  # the LoRA changed the model


def test_merge_under_hf_hub_offline(tiny_checkpoint, lora_files, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 made diffusers refuse a local file without `weight_name`, reported as a misfit."""
    ckpt = tiny_checkpoint("sd15")
    want = _reference(ckpt, [(lora_files["a"], 0.7)])("a cat", generator=torch.Generator().manual_seed(0), **CALL)
    hub_offline(monkeypatch)
    recipe = {"pass": "merge_lora", "path": str(lora_files["a"]), "scale": 0.7}
    compiled = compile_pipeline(ckpt, recipe, "torch", tmp_path / "out", show_progress=False)
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(got - want.images).max() < 1e-3


def test_loader_errors_keep_their_cause(tiny_checkpoint, lora_files, tmp_path, monkeypatch):
    """Only key / shape mismatches are reported as "does not fit"; any other loader error keeps its own words."""
    from diffusers import StableDiffusionPipeline

    def failing(self, *args, **kwargs):
        raise ValueError("When using the offline mode, you must specify a `weight_name`.")

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", failing)
    recipe = {"pass": "merge_lora", "path": str(lora_files["a"])}
    with pytest.raises(PassError) as info:
        compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", show_progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot load LoRA {lora_files['a']}: When using the offline mode"), message
    assert "does not fit" not in message and "architecture" not in message


@pytest.fixture(scope="module")
def lora_layouts(tiny_checkpoint, tmp_path_factory):
    """Factory: arch -> one random LoRA in each layout, and diffusers' unfused outputs for it (built once per arch).

    The reference pipeline loads each layout's file as its own adapter with `load_lora_weights` (when first
    asked for) and keeps the adapters unfused; `reference(layout, scale)` activates one with `set_adapters`.
    """
    built = {}

    def get(arch: str):
        if arch in built:
            return built[arch]
        checkpoint = tiny_checkpoint(arch)
        root = tmp_path_factory.mktemp(f"lora_layouts_{arch}")
        peft_file = _make_full_lora(checkpoint, root / "diffusers", seed=3)
        pipe = load_checkpoint(checkpoint).pipeline
        files = {
            "diffusers": peft_file,
            "kohya": _to_kohya(peft_file, root / "kohya.safetensors", arch, pipe.unet.config.layers_per_block),
        }
        inputs = _model_inputs(pipe, arch)
        modules = {name: getattr(pipe, name) for name in ("unet", *ENCODERS[arch])}
        outputs = {"base": _model_outputs(modules, inputs)}

        def reference(layout: str, scale: float) -> dict[str, torch.Tensor]:
            if (layout, scale) not in outputs:
                if layout not in pipe.get_list_adapters().get("unet", []):
                    pipe.load_lora_weights(str(files[layout]), adapter_name=layout)
                pipe.set_adapters([layout], adapter_weights=[scale])
                outputs[layout, scale] = _model_outputs(modules, inputs)
            return outputs[layout, scale]

        unet_modules = {key.split(".lora_", 1)[0] for key in load_file(str(peft_file)) if key.startswith("unet.")}
        built[arch] = SimpleNamespace(
            checkpoint=checkpoint,
            files=files,
            inputs=inputs,
            base=outputs["base"],
            reference=reference,
            unet_modules=len(unet_modules),
        )
        return built[arch]

    return get


@pytest.mark.parametrize(
    "arch,layout,scale", [("sd15", "diffusers", 0.6), ("sd15", "kohya", 1.0), ("sdxl", "kohya", 1.3)]
)
def test_fused_lora_matches_the_unfused_diffusers_lora(arch, layout, scale, lora_layouts, tmp_path):
    """Acceptance: the merge_lora pass (fused) == diffusers' unfused `load_lora_weights` path of the same file,
    max abs error < 1e-4, for the U-Net and every text encoder; a kohya file gives what its peft twin gives.

    The pass runs through the PassManager: the fused weights are what this checks; that the artifacts carry
    them is test_merged_lora_matches_diffusers_lora_pipeline's job.
    """
    case = lora_layouts(arch)
    loaded = load_checkpoint(case.checkpoint)
    ctx = PassContext(arch=loaded.arch.name, macs_resolution=(128, 128), cache_dir=tmp_path, show_progress=False)
    recipe = resolve_recipe([{"pass": "merge_lora", "path": str(case.files[layout]), "scale": scale}])
    (record,) = PassManager(recipe, count_cost=False).run(loaded.pipeline, ctx)
    assert record.metrics["unet_lora_layers"] == case.unet_modules  # every U-Net module of the file was attached
    assert not any("lora" in name for name, _ in loaded.pipeline.unet.named_parameters())
    got = _model_outputs({name: getattr(loaded.pipeline, name) for name in case.base}, case.inputs)
    want, twin = case.reference(layout, scale), case.reference("diffusers", scale)
    assert set(got) == {"unet", *ENCODERS[arch]}
    for name in got:
        error = (got[name] - want[name]).abs().max().item()
        assert error < 1e-4, f"{arch} {layout} x{scale}: {name} differs from diffusers' unfused LoRA by {error:.2e}"
        assert (got[name] - twin[name]).abs().max().item() < 1e-4, f"{name}: not the same LoRA as the peft file"
        assert (got[name] - case.base[name]).abs().max().item() > 1e-2, f"{name}: the LoRA changed nothing"


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
        compile_pipeline(
            tiny_checkpoint("sdxl"),
            [{"pass": "merge_lora", "path": str(lora_files["a"])}],
            "torch",
            tmp_path / "out",
            show_progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_bad_lora_inputs(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("sd15")
    with pytest.raises(PassError, match="does not exist"):
        compile_pipeline(
            ckpt,
            [{"pass": "merge_lora", "path": str(tmp_path / "none.safetensors")}],
            "torch",
            tmp_path / "o1",
            show_progress=False,
        )
    pickle = tmp_path / "lora.bin"
    torch.save({}, pickle)
    with pytest.raises(PassError, match="not .safetensors"):
        compile_pipeline(
            ckpt, [{"pass": "merge_lora", "path": str(pickle)}], "torch", tmp_path / "o2", show_progress=False
        )
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
    compiled = compile_pipeline(
        ckpt, [{"preset": "lcm-lora", "path": str(lora_files["a"])}], "onnx", tmp_path / "out", show_progress=False
    )
    assert [r["name"] for r in compiled.manifest["passes"]] == ["merge_lora", "set_scheduler"]
    assert compiled.manifest["defaults"]["num_inference_steps"] == 4
    assert compiled.manifest["defaults"]["guidance_scale"] == 1.0
    got = compiled("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    reference = _reference(ckpt, [(lora_files["a"], 1.0)])
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config, original_inference_steps=50)
    want = reference(
        "a cat", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert np.abs(got - want).max() < 1e-3
