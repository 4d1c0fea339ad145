"""`CompiledPipeline.set_loras`: LoRAs switched at run time on torch artifacts (in place) and onnx artifacts
(ONNX Runtime sessions rebuilt with initializer overrides).

The oracle is the compile-time merge (`merge_lora`, itself checked against diffusers' unfused LoRA pipeline
in test_merge_lora): an artifact with LoRAs set at run time must generate what an artifact compiled with the same
LoRAs merged generates, and `set_loras([])` must give back the artifact's own images exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_files import hub_offline, make_full_lora, to_kohya

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import ConfigError, PassError, PipelineArgumentError

CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def _images(pipe, **overrides):
    return pipe(["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **(CALL | overrides)).images


def _pointers(pipe) -> dict[str, int]:
    modules = pipe.components.modules
    return {
        f"{component}.{name}": p.data_ptr()
        for component in ("unet", "text_encoder")
        for name, p in modules[component].named_parameters()
    }


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_loras")
    ckpt = tiny_checkpoint("sd15")
    first = make_full_lora(ckpt, root / "a", seed=5)
    layers = load_compiled_unet_layers(ckpt)
    return {
        "a": first,
        "b": make_full_lora(ckpt, root / "b", seed=6),
        "a_kohya": to_kohya(first, root / "a_kohya.safetensors", "sd15", layers),
        "sdxl": make_full_lora(tiny_checkpoint("sdxl"), root / "xl", seed=7),
    }


def load_compiled_unet_layers(ckpt) -> int:
    import json

    return json.loads((ckpt / "unet" / "config.json").read_text())["layers_per_block"]


@pytest.fixture(scope="module")
def merged(tiny_checkpoint, loras, tmp_path_factory):
    """Factory: (recipe prefix, ((lora name, scale), ...)) -> images of the compile-time merge (torch target)."""
    root = tmp_path_factory.mktemp("merged")
    built = {}

    def get(items, after=()):
        key = (tuple(items), tuple(after))
        if key not in built:
            recipe = [{"pass": "merge_lora", "loras": [{"path": str(loras[n]), "scale": s} for n, s in items]}, *after]
            pipe = compile_pipeline(
                tiny_checkpoint("sd15"), recipe, "torch", root / str(len(built)), show_progress=False
            )
            built[key] = _images(load_compiled(pipe.root, device="cpu"))
        return built[key]

    return get


def test_set_loras_matches_compile_time_merges_and_restores_exactly(compiled, loras, merged):
    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    base = _images(pipe)
    pointers = _pointers(pipe)

    pipe.set_loras([(loras["a"], 0.7)])
    assert pipe.loras == [(str(loras["a"]), 0.7)]
    got = _images(pipe)
    np.testing.assert_allclose(got, merged([("a", 0.7)]), atol=1e-5)
    assert np.abs(got - base).max() > 1e-2  # the LoRA changed the model

    pipe.set_loras([{"path": loras["b"]}])  # replaces a; not cumulative
    np.testing.assert_allclose(_images(pipe), merged([("b", 1.0)]), atol=1e-5)

    pipe.set_loras([(loras["a"], 0.5), (loras["b"], 0.8)])  # several, each with its scale
    np.testing.assert_allclose(_images(pipe), merged([("a", 0.5), ("b", 0.8)]), atol=1e-5)

    pipe.set_loras([])
    assert pipe.loras == []
    np.testing.assert_array_equal(_images(pipe), base)  # the artifact's own weights, bit for bit
    assert _pointers(pipe) == pointers  # every change happened in place (CUDA graphs / compiled code stay valid)


def test_kohya_layout_switches_like_the_diffusers_layout(compiled, loras, merged):
    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    pipe.set_loras([str(loras["a_kohya"])])
    np.testing.assert_allclose(_images(pipe), merged([("a", 1.0)]), atol=1e-4)


def test_lora_that_does_not_fit_leaves_the_artifact_weights(compiled, loras):
    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    base = _images(pipe)
    pipe.set_loras([loras["a"]])
    with pytest.raises(PassError, match="does not fit|attaches to no module"):
        pipe.set_loras([loras["a"], loras["sdxl"]])  # a fuses, then the SDXL LoRA fails
    assert pipe.loras == []
    np.testing.assert_array_equal(_images(pipe), base)


def test_set_loras_under_hf_hub_offline(compiled, loras, merged, monkeypatch):
    want = merged([("a", 0.5), ("b", 0.8)])
    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    hub_offline(monkeypatch)
    pipe.set_loras([(loras["a"], 0.5), (loras["b"], 0.8)])
    np.testing.assert_allclose(_images(pipe), want, atol=1e-4)


def test_feature_cache_artifact_takes_runtime_loras(compiled, loras, merged):
    pipe = load_compiled(compiled("sd15", "torch", "deepcache").root, device="cpu")
    pipe.set_loras([(loras["a"], 0.7)])
    steps = dict(num_inference_steps=4)  # full and shallow steps
    want = merged([("a", 0.7)], after=("deepcache",))
    np.testing.assert_allclose(_images(pipe), want, atol=1e-5)
    assert _images(pipe, **steps).shape == want.shape


def test_refusals_change_nothing(compiled, loras, tmp_path):
    pruned = load_compiled(compiled("sd15", "torch", "bk-small").root, device="cpu")
    with pytest.raises(ConfigError, match="prune_blocks changed the U-Net's module layout"):
        pruned.set_loras([loras["a"]])
    pruned.set_loras([])  # nothing to switch: always fine

    from sdcompiler.targets.tensorrt import TensorRTTarget

    with pytest.raises(ConfigError, match="torch and onnx artifacts.*merge_lora"):
        TensorRTTarget().check_loras(pruned.manifest, [(str(loras["a"]), 1.0)])

    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    pipe.set_loras([loras["a"]])
    with_a = _images(pipe)
    pickle_file = tmp_path / "lora.bin"
    pickle_file.write_bytes(b"not a safetensors file")
    for bad, error, match in (
        (tmp_path / "missing.safetensors", PassError, "does not exist"),
        (pickle_file, PassError, "not .safetensors"),
        (42, PipelineArgumentError, "each LoRA must be"),
        ({"path": loras["b"], "weight": 1}, PipelineArgumentError, "each LoRA must be"),
    ):
        with pytest.raises(error, match=match):
            pipe.set_loras([bad])
        assert pipe.loras == [(str(loras["a"]), 1.0)]
    np.testing.assert_array_equal(_images(pipe), with_a)  # the refused calls left LoRA a in place


@pytest.mark.slow
def test_runtime_loras_reach_compiled_code_without_recompiling(compiled, loras, merged):
    pipe = load_compiled(compiled("sd15", "torch", "none").root, device="cpu", options={"compile": True})
    single = dict(guidance_scale=1.0)  # batch 1, as test_torch_compile (inductor's cache is warm)
    eager = load_compiled(compiled("sd15", "torch", "none").root, device="cpu")
    base = _images(pipe, **single)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    pipe.set_loras([(loras["a"], 0.7)])
    eager.set_loras([(loras["a"], 0.7)])
    got = _images(pipe, **single)
    np.testing.assert_allclose(got, _images(eager, **single), atol=1e-4)
    assert np.abs(got - base).max() > 1e-2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile for new weights


def test_generate_cli_fuses_loras(compiled, loras, tmp_path, capsys):
    from PIL import Image

    from sdcompiler.cli import main

    root = str(compiled("sd15", "torch", "none").root)
    common = [
        "generate",
        root,
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--lora", f"{loras['a']}:0.7", "--out", str(tmp_path / "lora.png")]) == 0
    assert main(common + ["--lora", str(loras["a"]), "--out", str(tmp_path / "lora1.png")]) == 0
    pipe = load_compiled(root, device="cpu")
    pipe.set_loras([(loras["a"], 0.7)])
    want = pipe(
        "a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images[0]
    images = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "lora", "lora1")}
    np.testing.assert_array_equal(images["lora"], np.asarray(want))
    assert np.abs(images["lora"].astype(int) - images["plain"]).max() > 0
    assert np.abs(images["lora1"].astype(int) - images["lora"]).max() > 0  # scale 1 differs from 0.7
    capsys.readouterr()
    assert main(common + ["--lora", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LoRA file") and "\n" not in err and not (tmp_path / "x.png").exists()


# --- onnx artifacts ---------------------------------------------------------------------------------------------


def test_onnx_set_loras_matches_compile_time_merges_and_restores(compiled, loras, merged):
    """Two LoRAs (diffusers and kohya layouts, U-Net and text encoder) switched on an onnx artifact give the
    images of the compile-time merge (torch: the same weights through ONNX Runtime, within 1e-3; measured
    ~4e-6); `set_loras([])` gives the artifact's own images back exactly, and no file of the artifact changed."""
    from sdcompiler.artifact import verify_files

    pipe = load_compiled(compiled("sd15", "onnx", "none").root, device="cpu")
    base = _images(pipe)
    pipe.set_loras([(loras["a_kohya"], 0.5), (loras["b"], 0.8)])
    got = _images(pipe)
    np.testing.assert_allclose(got, merged([("a", 0.5), ("b", 0.8)]), atol=1e-3)
    assert np.abs(got - base).max() > 1e-2
    overridden = {name: model.overridden for name, model in pipe.components.backends.items() if model.overridden}
    assert set(overridden) == {"unet", "text_encoder"} and len(overridden["text_encoder"]) > 0
    pipe.set_loras([])
    np.testing.assert_array_equal(_images(pipe), base)
    verify_files(pipe.root, pipe.manifest)  # every file still matches its sha256


def test_onnx_feature_cache_and_sdxl_take_runtime_loras(compiled, tiny_checkpoint, loras, merged, tmp_path):
    """deepcache: the refresh and shallow graphs both switch; SDXL: both text encoders and the U-Net."""
    pipe = load_compiled(compiled("sd15", "onnx", "deepcache").root, device="cpu")
    pipe.set_loras([(loras["a"], 0.7)])
    np.testing.assert_allclose(_images(pipe), merged([("a", 0.7)], after=("deepcache",)), atol=1e-3)
    assert {n for n, m in pipe.components.backends.items() if m.overridden} == {
        "unet_refresh",
        "unet_shallow",
        "text_encoder",
    }

    xl = load_compiled(compiled("sdxl", "onnx", "none").root, device="cpu")
    xl.set_loras([(loras["sdxl"], 0.6)])
    recipe = [{"pass": "merge_lora", "path": str(loras["sdxl"]), "scale": 0.6}]
    want = compile_pipeline(tiny_checkpoint("sdxl"), recipe, "torch", tmp_path / "xl", show_progress=False)
    np.testing.assert_allclose(_images(xl), _images(load_compiled(want.root, device="cpu")), atol=1e-3)
    assert {n for n, m in xl.components.backends.items() if m.overridden} == {"unet", "text_encoder", "text_encoder_2"}


def test_onnx_artifact_without_weight_map_is_refused(compiled, loras, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(compiled("sd15", "onnx", "none").root, copy)
    (copy / "unet" / "lora_map.json").unlink()  # as an artifact compiled before the maps
    manifest = copy / "manifest.json"
    text = manifest.read_text()
    import json

    data = json.loads(text)
    data["files"].pop("unet/lora_map.json")
    manifest.write_text(json.dumps(data))
    pipe = load_compiled(copy, device="cpu")
    with pytest.raises(Exception, match="no LoRA weight map for unet.*recompile") as info:
        pipe.set_loras([loras["a"]])
    assert "\n" not in str(info.value) and pipe.loras == []
