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

    with pytest.raises(ConfigError, match="built without it; recompile with --option refit=true"):
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


# --- tensorrt artifacts (engine refit, through the fake TensorRT: UNVERIFIED on a real one) ---------------------

TRT_ITEMS = [("a_kohya", 0.5), ("b", 0.8)]


@pytest.fixture(scope="module")
def trt_refit(tiny_checkpoint, tmp_path_factory):
    """A tensorrt artifact (fp16, refittable) without engines: its optimized graphs and LoRA maps."""
    from sdcompiler.compile import compile_artifact

    options = {"engines": False, "refit": True, "verify": False}
    out = tmp_path_factory.mktemp("trt_refit") / "artifact"
    return compile_artifact(tiny_checkpoint("sd15"), target="tensorrt", output_dir=out, target_options=options)


def _fake_trt_pipe(root, manifest=None):
    """The artifact as `load_compiled` would give it, each engine a `FakeEngine` holding its graph's weights."""
    from types import SimpleNamespace

    from fake_tensorrt import FakeEngine, FakeTensorRT

    from sdcompiler.artifact import read_manifest
    from sdcompiler.runtime import CompiledPipeline
    from sdcompiler.targets.tensorrt import TrtModel
    from sdcompiler.targets.tensorrt.build import OPTIMIZED

    fake, models = FakeTensorRT(), {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        model = object.__new__(TrtModel)  # no CUDA here: only the attributes a refit uses
        model.trt, model.name, model.graph = fake, name, None
        model.engine = FakeEngine.from_onnx(name, root / name / OPTIMIZED)
        models[name] = model
    components = SimpleNamespace(backends=models)
    pipe = CompiledPipeline(root, manifest or read_manifest(root), components, "cuda")
    return pipe, fake, {name: m.engine for name, m in models.items()}


def _weights(engines) -> dict[str, dict[str, np.ndarray]]:
    return {name: dict(engine.weights) for name, engine in engines.items()}


def _same_weights(engines, expected) -> bool:
    return all(
        engine.weights.keys() == expected[name].keys()
        and all(np.array_equal(engine.weights[w], expected[name][w]) for w in expected[name])
        for name, engine in engines.items()
    )


def test_tensorrt_artifact_records_refit_and_maps_its_optimized_graphs(trt_refit):
    import json

    import onnx

    from sdcompiler.artifact import read_manifest
    from sdcompiler.targets.tensorrt.build import OPTIMIZED, built_engines

    manifest = read_manifest(trt_refit)
    assert manifest["lowering"]["config"]["refit"] is True
    built = built_engines(manifest)
    assert all(built[name]["build"]["refit"] is True for name in ("text_encoder", "unet", "vae_decoder"))
    stages = {s["name"]: s for s in manifest["lowering"]["stages"]}
    assert stages["build_engine"]["settings"]["refit"] is True
    for name in ("text_encoder", "unet"):
        assert not (trt_refit / name / "lora_map.json").exists()  # the raw graph's map went with the raw graph
        weights = json.loads((trt_refit / name / "model.opt.lora_map.json").read_text())["weights"]
        graph = onnx.load(str(trt_refit / name / OPTIMIZED), load_external_data=False).graph
        held = {t.name: t for t in graph.initializer}
        assert weights and stages["optimize_onnx"]["results"][name]["lora_map"] == {
            "weights": len(weights),
            "dropped": 0,
        }
        for param, entry in weights.items():  # folding kept every mapped initializer, with the recorded shape
            tensor = held[entry["initializer"]]
            assert list(tensor.dims) == entry["shape"], param
            assert tensor.data_type == onnx.TensorProto.FLOAT16, param  # the engine's precision
    assert not (trt_refit / "vae_decoder" / "model.opt.lora_map.json").exists()


def test_tensorrt_set_loras_refits_the_onnx_targets_fused_weights_and_restores(compiled, trt_refit, loras, monkeypatch):
    """The refitter gets, for the U-Net and text-encoder engines only, exactly the initializers the onnx target
    overrides for the same LoRAs, with the same values in the engine's fp16 (the onnx artifact is fp32: within
    fp16 rounding); `set_loras([])` hands back the artifact's own values of those weights."""
    import json

    from sdcompiler.passes.onnx_export import graph_path, initializer_arrays
    from sdcompiler.targets.components import OrtModel

    items = [(loras[name], scale) for name, scale in TRT_ITEMS]
    onnx_pipe = load_compiled(compiled("sd15", "onnx", "none").root, device="cpu")
    overrides = {}
    override = OrtModel.override

    def spy(model, values):
        overrides[next(n for n, m in onnx_pipe.components.backends.items() if m is model)] = dict(values)
        override(model, values)

    monkeypatch.setattr(OrtModel, "override", spy)
    onnx_pipe.set_loras(items)

    pipe, fake, engines = _fake_trt_pipe(trt_refit)
    base = _weights(engines)
    pipe.set_loras(items)
    assert pipe.loras == [(str(p), s) for p, s in items]
    for name in ("text_encoder", "unet"):
        calls = [c for c in fake.calls if c[1] == name]
        handed = [c[2] for c in calls if c[0] == "refitter.set_named_weights"]
        assert calls[0] == ("Refitter", name)
        assert calls[1:-2] == [("refitter.set_named_weights", name, w) for w in handed]
        assert calls[-2:] == [("refitter.get_missing_weights", name), ("refitter.refit_cuda_engine", name)]
        onnx_map = json.loads((onnx_pipe.root / graph_path(name)).with_name("lora_map.json").read_text())["weights"]
        trt_map = json.loads((trt_refit / name / "model.opt.lora_map.json").read_text())["weights"]
        params = sorted(p for p, e in onnx_map.items() if e["initializer"] in overrides[name])
        assert params and sorted(handed) == sorted(trt_map[p]["initializer"] for p in params)
        for param in params:
            got = engines[name].weights[trt_map[param]["initializer"]]
            want = overrides[name][onnx_map[param]["initializer"]]
            want = want.T if onnx_map[param]["transposed"] != trt_map[param]["transposed"] else want
            stored = initializer_arrays(onnx_pipe.root / graph_path(name), [onnx_map[param]["initializer"]])
            stored = next(iter(stored.values()))
            stored = stored.T if onnx_map[param]["transposed"] != trt_map[param]["transposed"] else stored
            assert got.dtype == np.float16
            # fp16(fp16(W) + dW) against W + dW: half an fp16 step of W and one of the sum (2^-11 relative each)
            bound = (np.abs(stored) + np.abs(want)) * 2.0**-11 + 2.0**-24
            assert (np.abs(got.astype(np.float32) - want) <= bound).all(), param
        assert pipe._lora_params[name] == sorted(handed)
    assert not any(c[1] == "vae_decoder" for c in fake.calls)
    assert not _same_weights(engines, base)

    fake.calls.clear()
    pipe.set_loras([])
    assert pipe.loras == [] and _same_weights(engines, base)  # the artifact's own weights, bit for bit
    assert {c[1] for c in fake.calls} == {"text_encoder", "unet"}


def test_tensorrt_refit_refusals_leave_the_artifacts_weights(trt_refit, loras):
    import copy

    from sdcompiler.artifact import read_manifest
    from sdcompiler.errors import ArtifactError

    manifest = copy.deepcopy(read_manifest(trt_refit))
    manifest["lowering"]["config"]["refit"] = False
    plain, fake, _ = _fake_trt_pipe(trt_refit, manifest)
    with pytest.raises(ConfigError, match=r"built without it; recompile with --option refit=true") as info:
        plain.set_loras([loras["a"]])
    assert "\n" not in str(info.value) and fake.calls == [] and plain.loras == []
    plain.set_loras([])  # nothing to switch: always fine

    pipe, fake, engines = _fake_trt_pipe(trt_refit)
    base = _weights(engines)
    engines["unet"].missing_once = {"unet_fused_kernel"}  # a weight TensorRT holds that the graph does not
    with pytest.raises(
        ArtifactError, match=r"unet engine needs 1 more weight\(s\) to refit \(unet_fused_kernel\)"
    ) as e:
        pipe.set_loras([loras["a"]])
    assert "\n" not in str(e.value) and pipe.loras == [] and pipe._lora_params == {}
    assert ("refitter.refit_cuda_engine", "unet") not in fake.calls
    assert engines["text_encoder"].refits == 2 and _same_weights(engines, base)  # refitted, then put back

    pipe.set_loras([loras["a"]])  # a weight combined with a LoRA's is given from the graph
    held = set(pipe._lora_params["unet"])
    partner = next(w for w in sorted(engines["unet"].weights) if w not in held)
    engines["unet"].combined = {sorted(held)[0]: [partner]}
    engines["unet"].weights[partner] = np.zeros_like(base["unet"][partner])  # to see it handed again
    fake.calls.clear()
    pipe.set_loras([loras["b"]])
    assert ("refitter.set_named_weights", "unet", partner) in fake.calls
    np.testing.assert_array_equal(engines["unet"].weights[partner], base["unet"][partner])

    engines["unet"].missing_once = {"unet_fused_kernel"}  # a failed switch after LoRAs: all back to the artifact's
    with pytest.raises(ArtifactError, match="unet_fused_kernel"):
        pipe.set_loras([loras["a"]])
    assert pipe.loras == [] and _same_weights(engines, base)
