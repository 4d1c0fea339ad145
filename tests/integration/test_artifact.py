"""Artifacts: folder layout, manifest, file hashes, optimum-compatible ONNX signatures, atomic writing, load errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import ArtifactError, ConfigError, LoweringError
from sdcompiler.loading import checkpoint_sha256

FLOAT, INT64 = 1, 7  # onnx.TensorProto element types
MANIFEST_KEYS = {
    "schema_version",
    "sdcompiler_version",
    "source",
    "arch",
    "recipe",
    "passes",
    "lowering",
    "target",
    "files",
    "versions",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _run(pipe, **kwargs) -> np.ndarray:
    kwargs = dict(prompt="a red cube", num_inference_steps=2, guidance_scale=5.0) | kwargs
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images


# --- layout and manifest -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_onnx_artifact_layout(compiled, arch):
    root = compiled(arch, "onnx").root
    expected = {
        "manifest.json",
        "model_index.json",
        "unet/model.onnx",
        "unet/config.json",
        "text_encoder/model.onnx",
        "text_encoder/config.json",
        "vae_decoder/model.onnx",
        "vae_decoder/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    }
    if arch == "sdxl":
        expected |= {"text_encoder_2/model.onnx", "text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json"}
    tree = _tree(root)
    assert expected <= tree
    assert not any("partial" in p or p.endswith(".old") or "/tmp" in p for p in tree)
    # weights live in the ONNX files; the one small exception: SD's final text-encoder layer norm (clip_skip)
    extra = {p for p in tree if Path(p).suffix in (".safetensors", ".bin")}
    assert extra == (set() if arch == "sdxl" else {"text_encoder/final_layer_norm.safetensors"})
    assert {"unet/lora_map.json", "text_encoder/lora_map.json"} <= tree  # run-time LoRA switching
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert component in index


@pytest.mark.parametrize("arch, target", [("sd15", "onnx"), ("sdxl", "onnx"), ("sd15", "torch")])
def test_manifest(compiled, tiny_checkpoint, arch, target):
    pipe = compiled(arch, target)
    root, manifest = pipe.root, pipe.manifest
    assert manifest == json.loads((root / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["schema_version"] == 1
    assert manifest["sdcompiler_version"] == version("sd-compiler")
    assert manifest["arch"] == arch and manifest["target"] == target
    assert Path(manifest["source"]["path"]) == tiny_checkpoint(arch).resolve()
    assert manifest["source"]["sha256"] == checkpoint_sha256(tiny_checkpoint(arch))
    assert manifest["recipe"] == {"version": 1, "passes": []} and manifest["passes"] == []
    lowering = manifest["lowering"]
    assert lowering["target"] == target and lowering["stages"]
    for stage in lowering["stages"]:
        assert isinstance(stage["name"], str) and stage["seconds"] >= 0 and isinstance(stage["settings"], dict)
    versions = manifest["versions"]
    for package in ("torch", "diffusers") + (("onnx", "onnxruntime") if target == "onnx" else ()):
        assert versions[package] == version(package)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_onnx_verify_stage(compiled, arch):
    stages = {s["name"]: s for s in compiled(arch, "onnx").manifest["lowering"]["stages"]}
    assert list(stages) == ["export_onnx", "verify"]
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    results = stages["verify"]["results"]
    assert set(results) == set(components)
    for name in components:
        assert 0 <= results[name]["max_abs_error"] < 1e-4, name
    assert stages["export_onnx"]["settings"]["precision"] == "fp32"


@pytest.mark.parametrize("arch, target", [("sd15", "onnx"), ("sdxl", "onnx"), ("sd15", "torch")])
def test_every_file_is_listed_with_its_sha256(compiled, arch, target):
    root = compiled(arch, target).root
    files = compiled(arch, target).manifest["files"]
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, digest in files.items():
        assert _sha256(root / name) == digest, name


def test_fused_manifest_records_the_pass(compiled):
    from sdcompiler.recipe import resolve_recipe

    manifest = compiled("sd15", "torch", "fuse-qkv").manifest
    (record,) = manifest["passes"]
    assert record["name"] == "fuse_qkv"
    assert record["params_before"] == record["params_after"] > 0
    assert record["macs_before"] == record["macs_after"] > 0
    assert record["metrics"]["fused_attention_modules"] > 0 and record["seconds"] >= 0
    assert [s.name for s in resolve_recipe(manifest["recipe"])] == ["fuse_qkv"]
    assert manifest["macs_resolution"] == [128, 128]


# --- ONNX signatures, as optimum exports them ----------------------------------------------------------------


def _signature(path: Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return {
            v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        }

    inputs = describe(model.graph.input)
    names = [v.name for v in model.graph.input]
    return names, inputs, [v.name for v in model.graph.output], describe(model.graph.output)


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_onnx_unet_signature(compiled, arch):
    names, inputs, outputs, described = _signature(compiled(arch, "onnx").root / "unet" / "model.onnx")
    expected = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if arch == "sdxl" else [])
    assert names == expected
    assert outputs == ["out_sample"]
    assert all(dtype == FLOAT for dtype, _ in inputs.values())
    assert inputs["timestep"][1] == []  # a float scalar
    assert len(inputs["sample"][1]) == 4 and len(inputs["encoder_hidden_states"][1]) == 3
    # batch, height and width are dynamic (named) axes
    assert all(isinstance(inputs["sample"][1][i], str) for i in (0, 2, 3))
    assert all(isinstance(described["out_sample"][1][i], str) for i in (0, 2, 3))
    if arch == "sdxl":
        assert len(inputs["text_embeds"][1]) == 2 and inputs["time_ids"][1][1] == 6


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_onnx_text_encoder_and_vae_signatures(compiled, arch):
    root = compiled(arch, "onnx").root
    names, inputs, outputs, _ = _signature(root / "text_encoder" / "model.onnx")
    assert names == ["input_ids"] and inputs["input_ids"][0] == INT64 and len(inputs["input_ids"][1]) == 2
    if arch == "sdxl":  # optimum exports SDXL's encoders with output_hidden_states
        assert outputs == ["last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(3)]
        names, inputs, outputs, _ = _signature(root / "text_encoder_2" / "model.onnx")
        assert names == ["input_ids"] and inputs["input_ids"][0] == INT64
        assert outputs == ["text_embeds", "last_hidden_state"] + [f"hidden_states.{i}" for i in range(3)]
    else:  # SD's hidden states too (clip_skip); optimum reads the first two outputs by name
        assert outputs == ["last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(3)]
    names, inputs, outputs, described = _signature(root / "vae_decoder" / "model.onnx")
    assert names == ["latent_sample"] and inputs["latent_sample"][0] == FLOAT
    assert outputs == ["sample"] and described["sample"][0] == FLOAT


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_optimum_loads_the_onnx_artifact(compiled, arch):
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = compiled(arch, "onnx")
    theirs = ORTDiffusionPipeline.from_pretrained(pipe.root)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red cube", "a fox"], negative_prompt=["blurry", "dark"])
    ours, other = _run(pipe, **kwargs), _run(theirs, **kwargs)
    assert ours.shape == other.shape == (2, 128, 128, 3) and ours.std() > 0.01
    assert np.abs(ours - other).max() < 1e-3


# --- torch target --------------------------------------------------------------------------------------------


def test_torch_artifact_layout_and_pre_pass_unet_config(compiled, tiny_checkpoint):
    root = compiled("sd15", "torch", "fuse-qkv").root
    assert {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
    } <= _tree(root)
    stored = json.loads((root / "unet" / "config.json").read_text())
    source = json.loads((tiny_checkpoint("sd15") / "unet" / "config.json").read_text())
    assert {k: v for k, v in stored.items() if not k.startswith("_")} == {
        k: v for k, v in source.items() if not k.startswith("_")
    }
    from safetensors import safe_open

    with safe_open(str(root / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(".to_qkv." in k for k in keys) and any(".to_kv." in k for k in keys)
    assert not any(".attn1.to_q." in k for k in keys)


def test_loaded_fuse_qkv_torch_artifact_has_fused_modules(compiled):
    from diffusers.models.attention_processor import Attention

    from sdcompiler.targets.torch_target import rebuild_pipeline

    pipe = compiled("sd15", "torch", "fuse-qkv")
    fresh = load_compiled(pipe.root, device="cpu")
    rebuilt = rebuild_pipeline(pipe.root, fresh.manifest)
    attention = [m for m in rebuilt.unet.modules() if isinstance(m, Attention)]
    assert attention and all(hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in attention)
    assert not any(hasattr(m, "to_k") for m in attention)
    assert not any(p.is_meta for p in rebuilt.unet.parameters())
    assert "fuse_qkv" in repr(fresh)


def test_artifact_is_self_contained(tmp_path):
    """Delete the source checkpoint and move the artifact: it still loads and gives the same images."""
    from sdcompiler.testing import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", "sd15", "tiny", seed=1)
    first = compile_pipeline(checkpoint, recipe="fuse-qkv", target="torch", output_dir=tmp_path / "a", device="cpu")
    expected = _run(first)
    shutil.rmtree(checkpoint)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = load_compiled(tmp_path / "b", device="cpu")
    np.testing.assert_array_equal(_run(moved), expected)


# --- atomic writing ------------------------------------------------------------------------------------------


def _failing_export(monkeypatch):
    import sdcompiler.targets.onnx_target as onnx_target

    calls = []

    def export_model(export, folder, opset):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(b"half-written")
        calls.append(folder)
        raise LoweringError(f"ONNX export of {export.name} failed: injected by the test")

    monkeypatch.setattr(onnx_target, "export_model", export_model)
    return calls


def test_failed_lowering_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    calls = _failing_export(monkeypatch)
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("x")
    with pytest.raises(LoweringError, match="injected"):
        compile_pipeline(tiny_checkpoint("sd15"), target="onnx", output_dir=parent / "out")
    assert calls  # the failure happened mid-lowering, after a file was written
    assert sorted(p.name for p in parent.iterdir()) == ["neighbour.txt"]


def test_failed_lowering_keeps_the_existing_artifact(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    compile_pipeline(tiny_checkpoint("sd15"), target="torch", output_dir=out, device="cpu")
    before = {p: _sha256(out / p) for p in _tree(out) if (out / p).is_file()}
    _failing_export(monkeypatch)
    with pytest.raises(LoweringError):
        compile_pipeline(tiny_checkpoint("sd15"), target="onnx", output_dir=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p: _sha256(out / p) for p in _tree(out) if (out / p).is_file()} == before
    assert load_compiled(out, device="cpu").target == "torch"


def test_recompiling_replaces_an_existing_artifact(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    compile_pipeline(tiny_checkpoint("sd15"), target="torch", output_dir=out, device="cpu")
    (out / "notes.txt").write_text("a user's file in the artifact folder")
    with pytest.raises(ArtifactError, match=r"not part of the artifact there \(notes.txt\)"):  # never deleted
        compile_pipeline(tiny_checkpoint("sd15"), recipe="fuse-qkv", target="torch", output_dir=out, device="cpu")
    assert (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe="fuse-qkv", target="torch", output_dir=out, device="cpu")
    assert [p["name"] for p in pipe.manifest["passes"]] == ["fuse_qkv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial- / .old- siblings
    assert [p["name"] for p in load_compiled(out, device="cpu").manifest["passes"]] == ["fuse_qkv"]


def test_non_artifact_destination_is_refused_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError) as info:
        compile_pipeline(tiny_checkpoint("sd15"), target="torch", output_dir=out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert _tree(out) == {"keep.txt"} and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ArtifactError):
        compile_pipeline(tiny_checkpoint("sd15"), target="torch", output_dir=a_file)
    assert a_file.read_text() == "x"


def test_bad_target_and_target_options_fail_before_work(tiny_checkpoint, tmp_path):
    with pytest.raises(LoweringError, match="onnx"):
        compile_pipeline(tiny_checkpoint("sd15"), target="tflite", output_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="bogus"):
        compile_pipeline(tiny_checkpoint("sd15"), target="onnx", target_options={"bogus": 1}, output_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="precision"):
        compile_pipeline(
            tiny_checkpoint("sd15"), target="torch", target_options={"precision": "int3"}, output_dir=tmp_path / "c"
        )
    assert list(tmp_path.iterdir()) == []


# --- load errors ---------------------------------------------------------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(ArtifactError) as info:
        load_compiled(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_missing_folder(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nowhere")


def test_load_folder_without_manifest(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert "manifest.json" in _load_error(tmp_path)


@pytest.fixture
def artifact_copy(compiled, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(compiled("sd15", "torch").root, copy)
    return copy


def test_load_manifest_with_missing_file(artifact_copy):
    (artifact_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert "unet/diffusion_pytorch_model.safetensors" in _load_error(artifact_copy)


def test_load_invalid_or_future_manifest(artifact_copy):
    manifest = artifact_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(data | {"schema_version": 99}))
    assert "schema_version" in _load_error(artifact_copy)
    manifest.write_text("{not json")
    assert "JSON" in _load_error(artifact_copy)


def test_artifact_root_permissions_follow_the_umask(compiled):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    root = compiled("sd15", "torch").root
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(root.stat().st_mode) == stat.S_IMODE((root / "unet").stat().st_mode)
