"""The tensorrt target on a machine without TensorRT: everything up to the engine builder.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_tensorrt_target_compile.py.

TensorRT cannot be installed on any machine here, not even the lent GPU: its PyPI
packages download from NVIDIA's index, which is unreachable. So these tests cover the optimization
profiles, the settings, the engine cache key, the optimized ONNX graphs (run in ONNX Runtime), the
compile's failure without TensorRT, and, through `FakeTensorRT` (a stand-in that only records the calls
made on it, never a TensorRT), which calls `build_serialized_engine` makes and when the engine cache and
the load-time rebuild call it at all. tests/gpu/test_tensorrt_gpu.py builds and runs real engines.
"""

from __future__ import annotations

import json
import logging

import onnx
import pytest
import torch
from fake_tensorrt import FakeTensorRT

from sdcompiler.errors import ConfigError, LoweringError
from sdcompiler.passes.onnx_export import export_model
from sdcompiler.serving import ModelSpec, TensorSpec, model_config
from sdcompiler.targets import LowerContext, get_target
from sdcompiler.targets.components import OrtModel
from sdcompiler.targets.tensorrt import runtime as trt_runtime
from sdcompiler.targets.tensorrt import target as trt_target
from sdcompiler.targets.tensorrt.build import (
    OPTIMIZED,
    EngineBuild,
    build_serialized_engine,
    cached_engine,
    engine_cache_key,
    optimize_onnx,
    plan_filename,
    trtexec_command,
)
from sdcompiler.targets.tensorrt.config import (
    PRECISIONS,
    ModelSizes,
    TensorRTTargetConfig,
    dimension_ranges,
    onnx_input_dims,
    profile_shapes,
)

SD15, SDXL = ModelSizes(8, 512), ModelSizes(8, 1024)


def _config(**options) -> TensorRTTargetConfig:
    return TensorRTTargetConfig.from_dict(options, owner="target tensorrt")


def test_default_ranges_for_sd15_and_sdxl():
    sd15 = dimension_ranges(_config(), SD15)
    assert sd15 == {
        "text_encoder": {"batch_size": (1, 1, 4), "sequence_length": (77, 77, 77)},
        "unet": {
            "batch_size": (1, 2, 8),
            "sequence_length": (77, 77, 77),
            "height": (32, 64, 96),
            "width": (32, 64, 96),
        },
        "vae_decoder": {"batch_size": (1, 1, 4), "latent_height": (32, 64, 96), "latent_width": (32, 64, 96)},
    }  # pixels 256 / 512 / 768; the U-Net's batch doubled for classifier-free guidance
    sdxl = dimension_ranges(_config(), SDXL)
    assert sdxl["unet"]["height"] == sdxl["vae_decoder"]["latent_width"] == (64, 128, 192)  # 512 / 1024 / 1536 px


def test_custom_ranges_without_guidance_and_static_mode():
    config = _config(batch_size=[1, 2, 8], height=[256, 512, 1024], width=[512, 768, 1024])
    ranges = dimension_ranges(config, ModelSizes(8, 512, guidance=False))
    assert ranges["unet"] == {
        "batch_size": (1, 2, 16),
        "sequence_length": (77, 77, 77),
        "height": (32, 64, 128),
        "width": (64, 96, 128),
    }
    assert ranges["text_encoder"]["batch_size"] == (1, 2, 8)
    static = dimension_ranges(_config(static=True), SD15)
    assert static["unet"] == {
        "batch_size": (2, 2, 2),
        "sequence_length": (77, 77, 77),
        "height": (64, 64, 64),
        "width": (64, 64, 64),
    }
    assert all(r[0] == r[1] == r[2] for dims in static.values() for r in dims.values())


def test_ranges_must_be_multiples_of_the_vae_factor():
    with pytest.raises(ConfigError, match="multiples of the VAE factor 8"):
        dimension_ranges(_config(height=[256, 500, 768]), SD15)


def test_profile_shapes_follow_the_named_dimensions():
    sdxl_unet = {
        "sample": ["batch_size", 4, "height", "width"],
        "timestep": [],
        "encoder_hidden_states": ["batch_size", "sequence_length", 2048],
        "text_embeds": ["batch_size", 1280],
        "time_ids": ["batch_size", 6],
    }
    profile = profile_shapes(sdxl_unet, dimension_ranges(_config(), SDXL)["unet"])
    assert profile == {
        "sample": ((1, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192)),
        "encoder_hidden_states": ((1, 77, 2048), (2, 77, 2048), (8, 77, 2048)),
        "text_embeds": ((1, 1280), (2, 1280), (8, 1280)),
        "time_ids": ((1, 6), (2, 6), (8, 6)),
    }  # the 0-d timestep has no dynamic dimension, so no profile entry
    with pytest.raises(LoweringError, match="'deep_height'"):
        profile_shapes({"deep": ["batch_size", 8, "deep_height", 4]}, {"batch_size": (1, 1, 1)})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"precision": "int8"}, "add preset .int8. to the recipe and keep precision .fp16."),
        ({"precision": "fp8"}, "Q/DQ U-Net graph that the ptq pass makes: add preset .fp8."),
        ({"precision": "fp64"}, "must be one of"),
        ({"batch_size": [2, 1, 4]}, "min <= opt <= max"),
        ({"height": [256, 512]}, r"\[min, opt, max\]"),
        ({"width": [0, 512, 768]}, "0 < min"),
        ({"builder_optimization_level": 6}, "0..5"),
        ({"workspace_gb": 0}, "workspace_gb must be > 0"),
        ({"workspace": 4}, "unknown key"),
    ],
)
def test_invalid_settings_are_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=match) as info:
        get_target("tensorrt").config_class.from_dict(options, owner="target tensorrt")
    assert "\n" not in str(info.value)


def test_engine_cache_key_changes_with_each_input_and_only_then():
    build = EngineBuild({"sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 24, 24))}).to_dict()
    base = engine_cache_key("a" * 64, build, "9.0", "10.9.0")
    assert base == engine_cache_key("a" * 64, dict(reversed(build.items())), "9.0", "10.9.0")
    changed = [
        engine_cache_key("b" * 64, build, "9.0", "10.9.0"),
        engine_cache_key("a" * 64, {**build, "builder_optimization_level": 5}, "9.0", "10.9.0"),
        engine_cache_key("a" * 64, {**build, "workspace_gb": 4.0}, "9.0", "10.9.0"),
        engine_cache_key("a" * 64, EngineBuild({"sample": ((1, 4, 8, 8),) * 3}).to_dict(), "9.0", "10.9.0"),
        engine_cache_key("a" * 64, build, "8.9", "10.9.0"),
        engine_cache_key("a" * 64, build, "9.0", "10.10.0"),
    ]
    assert len({base, *changed}) == 1 + len(changed)


def test_plan_names_are_the_ones_serving_maps_compute_capabilities_to():
    assert plan_filename("9.0") == "model_sm90.plan" and plan_filename("12.0") == "model_sm120.plan"
    spec = ModelSpec(
        "unet",
        (TensorSpec("sample", "TYPE_FP16", (-1, 4, -1, -1)),),
        (TensorSpec("out_sample", "TYPE_FP16", (-1, 4, -1, -1)),),
        platform="tensorrt_plan",
        cc_model_filenames={cc: plan_filename(cc) for cc in ("8.9", "9.0")},
    )
    text = model_config(spec, max_batch_size=0, kind="GPU", instance_count=1)
    assert 'cc_model_filenames { key: "9.0" value: "model_sm90.plan" }' in text


def _build(**options) -> EngineBuild:
    profile = {
        "sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 24, 24)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32)),
    }
    return EngineBuild(profile, **options)


def test_builder_asks_for_a_strongly_typed_network_with_the_profile_and_limits(tmp_path):
    fake = FakeTensorRT()
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"earlier timings")
    plan = build_serialized_engine(
        fake, tmp_path / "model.opt.onnx", _build(workspace_gb=4, builder_optimization_level=5), timing
    )
    assert plan == b"engine"
    assert fake.calls == [
        ("builder.create_network", 1 << 1),
        ("parser.parse_from_file", str(tmp_path / "model.opt.onnx")),
        ("builder.create_builder_config",),
        ("config.set_memory_pool_limit", "workspace", 4 << 30),
        ("config.builder_optimization_level=", 5),
        ("builder.create_optimization_profile",),
        ("profile.set_shape", "sample", (1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 24, 24)),
        ("profile.set_shape", "encoder_hidden_states", (1, 77, 32), (2, 77, 32), (8, 77, 32)),
        ("config.add_optimization_profile", "<profile>"),
        ("config.create_timing_cache", b"earlier timings"),
        ("config.set_timing_cache", "<timing_cache>", False),
        ("builder.build_serialized_network", "<network>", "<config>"),
        ("config.get_timing_cache",),
        ("timing_cache.serialize",),
    ]
    assert timing.read_bytes() == b"timings"  # written back for the next build

    fake = FakeTensorRT()
    build_serialized_engine(fake, tmp_path / "model.opt.onnx", _build(), tmp_path / "new.cache")
    assert not any(call[0] == "config.set_memory_pool_limit" for call in fake.calls)  # None: TensorRT's default
    assert ("config.builder_optimization_level=", 3) in fake.calls
    assert ("config.create_timing_cache", b"") in fake.calls  # no cache file yet: an empty cache


def test_refit_sets_the_refit_builder_flag_only_when_asked(tmp_path):
    """REFIT (every weight refittable), never REFIT_IDENTICAL (the build's own weights only) nor STRIP_PLAN: the fake
    has no such flags, so asking for them fails here."""
    fake = FakeTensorRT()
    build_serialized_engine(fake, tmp_path / "model.opt.onnx", _build(refit=True), tmp_path / "t.cache")
    names = [call[0] for call in fake.calls]
    assert ("config.set_flag", "refit") in fake.calls
    assert names.index("config.set_flag") < names.index("builder.build_serialized_network")
    fake = FakeTensorRT()
    build_serialized_engine(fake, tmp_path / "model.opt.onnx", _build(), tmp_path / "t.cache")
    assert not any(call[0] == "config.set_flag" for call in fake.calls)

    assert "--refit" in trtexec_command(tmp_path / "m.onnx", _build(refit=True))
    assert "--refit" not in trtexec_command(tmp_path / "m.onnx", _build())
    plain, refit = _build().to_dict(), _build(refit=True).to_dict()
    assert engine_cache_key("a" * 64, plain, "9.0", "10.9.0") != engine_cache_key("a" * 64, refit, "9.0", "10.9.0")
    assert EngineBuild.from_dict(json.loads(json.dumps(refit))) == _build(refit=True)
    older = {k: v for k, v in plain.items() if k != "refit"}  # a manifest from before the option
    assert EngineBuild.from_dict(json.loads(json.dumps(older))) == _build()
    assert _config(refit=True).refit and not _config().refit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_weight_map_finds_fp16_and_bf16_initializers(tmp_path, dtype):
    """The tensorrt target exports bf16 U-Nets too (numpy has no bf16: the map matches their bytes)."""
    from onnx import TensorProto, helper

    from sdcompiler.passes.onnx_export import lora_weight_map

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv2d(2, 5, 3))
    kind = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}[dtype]

    def initializer(name, tensor):
        raw = tensor.detach().to(dtype).contiguous().view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, kind, list(tensor.shape), raw, raw=True)

    weights = [initializer("onnx::MatMul_7", module[0].weight.T), initializer("1.weight", module[1].weight)]
    graph = helper.make_graph([], "g", [], [], initializer=weights)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert lora_weight_map(module, tmp_path / "model.onnx", dtype) == {
        "0.weight": {"initializer": "onnx::MatMul_7", "transposed": True},
        "1.weight": {"initializer": "1.weight", "transposed": False},
    }


@pytest.mark.parametrize(
    "fake, match",
    [
        (FakeTensorRT(parses=False), "could not parse .*node 7 \\(Conv\\): unsupported data type"),
        (FakeTensorRT(builds=False), "could not build an engine"),
    ],
)
def test_builder_failures_are_one_line_errors_with_a_repro_command(tmp_path, fake, match):
    with pytest.raises(LoweringError, match=match) as info:
        build_serialized_engine(fake, tmp_path / "model.opt.onnx", _build(workspace_gb=2), tmp_path / "t.cache")
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"trtexec --onnx={tmp_path / 'model.opt.onnx'} --stronglyTyped --minShapes=sample:1x4x8x8,"
        "encoder_hidden_states:1x77x32 --optShapes=sample:2x4x16x16,"
    ) in message
    assert "--builderOptimizationLevel=3 --memPoolSize=workspace:2048" in message


def test_engine_cache_hit_skips_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    graph = tmp_path / "model.opt.onnx"
    graph.write_bytes(b"graph")
    fake = FakeTensorRT()

    def builds() -> int:
        return sum(call[0] == "builder.build_serialized_network" for call in fake.calls)

    plan, first = cached_engine(fake, graph, _build(), "9.0")
    assert first["cache"] == "miss" and plan.read_bytes() == b"engine" and builds() == 1
    assert plan == tmp_path / "cache" / "engines" / first["key"] / "model.plan"
    assert (tmp_path / "cache" / "engines" / "timing-trt10.0.0-fake-sm90.cache").read_bytes() == b"timings"
    assert cached_engine(fake, graph, _build(), "9.0")[1] == {"key": first["key"], "cache": "hit"}
    assert builds() == 1
    assert cached_engine(fake, graph, _build(), "8.9")[1]["cache"] == "miss"  # another GPU arch
    graph.write_bytes(b"another graph")
    assert cached_engine(fake, graph, _build(), "9.0")[1]["cache"] == "miss"
    assert builds() == 3


def test_load_rebuilds_for_another_gpu_or_tensorrt_version(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SDCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / OPTIMIZED).write_bytes(b"graph")
    (tmp_path / "unet" / "model_sm90.plan").write_bytes(b"plan for sm90")
    fake = FakeTensorRT()
    built = json.loads(
        json.dumps({"compute_capability": "9.0", "tensorrt": fake.__version__, "unet": {"build": _build().to_dict()}})
    )  # as the manifest stores it

    monkeypatch.setattr(trt_runtime, "compute_capability", lambda: "9.0")
    assert trt_runtime._engine_bytes(fake, tmp_path, "unet", built) == b"plan for sm90"
    assert fake.calls == [] and not caplog.records

    monkeypatch.setattr(trt_runtime, "compute_capability", lambda: "8.9")
    with caplog.at_level(logging.WARNING, logger=trt_runtime.__name__):
        assert trt_runtime._engine_bytes(fake, tmp_path, "unet", built) == b"engine"
    assert "built for compute capability 9.0 with TensorRT 10.0.0-fake; this GPU has 8.9" in caplog.text
    assert ("parser.parse_from_file", str(tmp_path / "unet" / OPTIMIZED)) in fake.calls
    assert ("profile.set_shape", "sample", (1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 24, 24)) in fake.calls

    monkeypatch.setattr(trt_runtime, "compute_capability", lambda: "9.0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=trt_runtime.__name__):
        assert trt_runtime._engine_bytes(fake, tmp_path, "unet", {**built, "tensorrt": "9.3.0"}) == b"engine"
    assert "with TensorRT 9.3.0; this GPU has 9.0 and TensorRT is 10.0.0-fake: rebuilding" in caplog.text


@pytest.fixture(scope="module")
def tiny_sd15(tiny_checkpoint):
    from sdcompiler.loading import load_checkpoint

    return load_checkpoint(tiny_checkpoint("sd15"))


@pytest.fixture(scope="module")
def exported(tiny_sd15, tmp_path_factory):
    """The tiny SD1.5's components exported (fp32) and optimized: [(export, raw, report, optimized path)]."""
    root = tmp_path_factory.mktemp("trt-onnx")
    graphs = []
    for export in trt_target._component_exports(tiny_sd15.pipeline, tiny_sd15.arch, _config(precision="fp32")):
        raw = export_model(export, root / export.name, 18)
        graphs.append((export, raw, optimize_onnx(raw, raw.with_name(OPTIMIZED)), raw.with_name(OPTIMIZED)))
    return graphs


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, ["fp16", "fp16", "fp32"]),
        ({"precision": "bf16"}, ["fp32", "bf16", "fp32"]),  # the TorchScript exporter fails on bf16 CLIP graphs
        ({"precision": "fp32", "vae_precision": "fp16"}, ["fp32", "fp32", "fp16"]),
    ],
)
def test_precision_sets_each_exported_graphs_type(tiny_sd15, options, expected):
    exports = trt_target._component_exports(tiny_sd15.pipeline, tiny_sd15.arch, _config(**options))
    assert [e.name for e in exports] == ["text_encoder", "unet", "vae_decoder"]
    assert [PRECISIONS[e.dtype] for e in exports] == expected


def test_feature_cache_artifacts_are_refused_before_any_export(tiny_sd15, tmp_path):
    ctx = LowerContext(tiny_sd15.arch, {}, False, {"guidance_scale": 7.5, "feature_cache": {"interval": 3}})
    with pytest.raises(LoweringError, match="feature cache's shallow U-Net"):
        get_target("tensorrt").lower(tiny_sd15.pipeline, tmp_path, _config(), ctx)
    assert list(tmp_path.iterdir()) == []


def test_optimized_graphs_run_in_onnx_runtime_and_match_the_exports(exported):
    for export, raw, report, optimized in exported:
        assert report["nodes_after"] < report["nodes_before"], export.name
        assert report["files"] == [OPTIMIZED]
        onnx.checker.check_model(onnx.load(str(optimized)), full_check=True)
        inputs = dict(zip(export.input_names, export.args))
        if export.name == "unet":  # another batch and a latent size unlike the traced one: still dynamic
            inputs = {
                "sample": torch.randn(1, 4, 12, 16),
                "timestep": torch.tensor(500.0),
                "encoder_hidden_states": torch.randn(1, 77, inputs["encoder_hidden_states"].shape[-1]),
            }
        expected = OrtModel(raw, ["CPUExecutionProvider"])(**inputs)
        got = OrtModel(optimized, ["CPUExecutionProvider"])(**inputs)
        for name in export.output_names:
            scale = max(1.0, expected[name].abs().max().item())
            assert (got[name] - expected[name]).abs().max().item() <= 1e-5 * scale, (export.name, name)


def test_profile_from_the_optimized_unet_graph(exported):
    (optimized,) = [path for export, _, _, path in exported if export.name == "unet"]
    ranges = dimension_ranges(_config(), ModelSizes(8, 128))  # tiny SD1.5: 16 x 16 latents, 128 px
    assert profile_shapes(onnx_input_dims(optimized), ranges["unet"]) == {
        "sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 24, 24)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32)),
    }


def test_graphs_with_external_data_stay_external(exported, tmp_path):
    (export, raw, _, _) = [item for item in exported if item[0].name == "vae_decoder"][0]
    big = tmp_path / "model.onnx"
    onnx.save_model(
        onnx.load(str(raw)),
        str(big),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    report = optimize_onnx(big, tmp_path / OPTIMIZED)
    assert report["files"] == [OPTIMIZED, OPTIMIZED + ".data"]
    assert not list(tmp_path.glob(".inferred-*"))
    inputs = dict(zip(export.input_names, export.args))
    expected = OrtModel(raw, ["CPUExecutionProvider"])(**inputs)["sample"]
    got = OrtModel(tmp_path / OPTIMIZED, ["CPUExecutionProvider"])(**inputs)["sample"]
    assert torch.allclose(got, expected, atol=1e-5)
