"""The ptq pass's modelopt backend (target tensorrt): INT8 / FP8 Q/DQ on tiny SD1.5, up to the engine build.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_ptq_modelopt.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (the [modelopt] extra)")

from sdcompiler.errors import LoweringError, MissingDependencyError, PassError  # noqa: E402
from sdcompiler.passes import PassContext, get_pass  # noqa: E402
from sdcompiler.passes import ptq_modelopt as mo  # noqa: E402

SMALL = {"calib_prompts": 1, "calib_steps": 2, "resolution": 128}  # 4 calibration inputs (both CFG halves)


def _pipeline(tiny_checkpoint, arch="sd15"):
    from sdcompiler.loading import load_checkpoint

    return load_checkpoint(tiny_checkpoint(arch)).pipeline


def _run(pipe, tmp_path, arch="sd15", ctx=None, **options):
    ptq = get_pass("ptq")
    config = ptq.config_class.from_dict({**SMALL, **options}, owner="ptq")
    ctx = ctx or PassContext(
        arch=arch, macs_resolution=(128, 128), cache_dir=tmp_path, show_progress=False, target="tensorrt"
    )
    ptq.requires(pipe, config, ctx)
    return ptq.run(pipe, config, ctx)


def test_int8_calibrates_every_quantizer_with_smoothquant(tiny_checkpoint, tmp_path):
    pipe = _pipeline(tiny_checkpoint)
    ctx = PassContext(
        arch="sd15", macs_resolution=(128, 128), cache_dir=tmp_path, show_progress=False, target="tensorrt"
    )
    metrics = _run(pipe, tmp_path, ctx=ctx)
    print(f"tiny sd15 modelopt int8 level 3: eps SQNR {metrics['sqnr_db']:.2f} dB")
    assert metrics["sqnr_db"] > 15.0
    assert metrics["calibration_inputs"] == 2 * SMALL["calib_prompts"] * SMALL["calib_steps"]
    layers = mo.selected_layers(pipe.unet, 3.0, mo.DEFAULT_EXCLUDE)
    quantizers = mo.quantizers(pipe.unet)
    assert metrics["quantizers"] == len(quantizers) == 2 * len(layers) == 2 * metrics["quantized_layers"]
    assert set(quantizers) == {f"{n}.{q}" for n in layers for q in ("input_quantizer", "weight_quantizer")}
    for name, quantizer in quantizers.items():
        amax = quantizer.amax
        assert amax is not None and torch.isfinite(amax).all() and (amax > 0).all(), name
    for name, kind in layers.items():
        module = pipe.unet.get_submodule(name)
        assert module.weight_quantizer.amax.numel() == module.weight.shape[0]  # per output channel
        assert module.input_quantizer.amax.numel() == 1  # per tensor
        if kind == "linear":  # SmoothQuant: one input scale per input channel, folded into the weights
            assert module.input_quantizer.pre_quant_scale.shape == (module.in_features,), name
    handed = ctx.products.unet_quantization  # the typed record the tensorrt target reads
    assert (handed.backend, handed.precision, handed.onnx_folder) == ("modelopt", "int8", None)
    settings = handed.settings
    assert settings["algorithm"] == {"method": "smoothquant", "alpha": 0.8} and settings["level"] == 3.0

    again = _pipeline(tiny_checkpoint)  # calibration is deterministic: the same ranges from a fresh pipeline
    _run(again, tmp_path)
    for name, quantizer in mo.quantizers(again.unet).items():
        assert torch.equal(quantizer.amax, quantizers[name].amax), name


def test_sdxl_int8_calibrates_with_the_added_conditioning(tiny_checkpoint, tmp_path):
    pipe = _pipeline(tiny_checkpoint, "sdxl")
    metrics = _run(pipe, tmp_path, arch="sdxl")
    print(f"tiny sdxl modelopt int8 level 3: eps SQNR {metrics['sqnr_db']:.2f} dB")
    assert metrics["sqnr_db"] > 15.0
    assert metrics["quantizers"] == 2 * len(mo.selected_layers(pipe.unet, 3.0, mo.DEFAULT_EXCLUDE))
    assert not any(n.startswith("add_embedding") for n in mo.quantizers(pipe.unet))


def test_macs_are_counted_through_the_quantizers(tiny_checkpoint, tmp_path):
    from sdcompiler.passes.accounting import count_macs

    pipe = _pipeline(tiny_checkpoint)
    before = count_macs(pipe.unet, (128, 128))
    _run(pipe, tmp_path, level=1.0, smoothquant_alpha=None)
    assert count_macs(pipe.unet, (128, 128)) == before
    assert all(q.is_enabled for q in mo.quantizers(pipe.unet).values())  # switched back on after the count
    assert len(mo.quantizers(pipe.unet)) == 2 * len(mo.selected_layers(pipe.unet, 1.0, mo.DEFAULT_EXCLUDE))


def test_fp8_level_4_quantizes_attention(tiny_checkpoint, tmp_path):
    pipe = _pipeline(tiny_checkpoint)
    metrics = _run(pipe, tmp_path, precision="fp8", level=4.0)
    print(f"tiny sd15 modelopt fp8 level 4: eps SQNR {metrics['sqnr_db']:.2f} dB")
    assert metrics["sqnr_db"] > 15.0
    attention = mo.attention_modules(pipe.unet, mo.DEFAULT_EXCLUDE)
    quantizers = mo.quantizers(pipe.unet)
    for name in attention:
        for part in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
            assert f"{name}.{part}" in quantizers
    assert metrics["quantizers"] == 2 * metrics["quantized_layers"] + 4 * len(attention)
    weight = next(q for n, q in quantizers.items() if n.endswith("weight_quantizer"))
    assert weight.num_bits == (4, 3) and weight.amax.numel() == 1  # E4M3, per tensor


def test_backends_pick_their_targets(tiny_checkpoint, tmp_path):
    from sdcompiler import compile_pipeline

    ptq = get_pass("ptq")
    config = ptq.config_class.from_dict
    assert ptq.supported_targets(config({}, owner="ptq")) == ("onnx", "tensorrt", "torch")
    assert ptq.supported_targets(config({"precision": "fp8"}, owner="ptq")) == ("tensorrt", "torch")
    assert ptq.supported_targets(config({"backend": "modelopt"}, owner="ptq")) == ("tensorrt", "torch")
    assert ptq.supported_targets(config({"backend": "onnxruntime"}, owner="ptq")) == ("onnx",)
    assert config({}, owner="ptq").backend_for("tensorrt") == "modelopt"
    assert config({}, owner="ptq").backend_for("torch") == "modelopt"
    assert config({}, owner="ptq").backend_for("onnx") == "onnxruntime"
    out = tmp_path / "out"
    with pytest.raises(LoweringError, match=r"'ptq'.*target='tensorrt'"):  # refused before loading anything
        compile_pipeline(
            tmp_path / "not-loaded", recipe=[{"preset": "int8", "backend": "modelopt"}], target="onnx", output_dir=out
        )
    with pytest.raises(PassError, match="'entropy' is ONNX Runtime's"):
        compile_pipeline(
            tiny_checkpoint("sd15"),
            recipe=[{"preset": "int8", "calibration": "entropy"}],
            target="tensorrt",
            output_dir=out,
            device="cpu",
            target_options={"engines": False},  # past the TensorRT check: the pass's own refusal
        )
    assert not out.exists()


@pytest.mark.parametrize("preset", ["int8", "fp8"])
def test_tensorrt_compile_exports_qdq_then_names_the_extra(preset, tiny_checkpoint, tmp_path, monkeypatch):
    import onnx

    import sdcompiler.targets.tensorrt.target as tt
    from sdcompiler import compile_pipeline
    from sdcompiler.compile import compile_artifact
    from sdcompiler.targets.tensorrt.build import OPTIMIZED

    kept = tmp_path / "kept"
    kept.mkdir()
    optimize, verify, verified = tt.optimize_onnx, tt._verify, {}

    def keep_unet(source: Path, target: Path):
        report = optimize(source, target)
        if target.parent.name == "unet":
            for file in target.parent.glob(target.name + "*"):
                shutil.copy(file, kept / file.name)
        return report

    def record(export, path, quantization=None):
        verified[export.name] = verify(export, path, quantization)
        return verified[export.name]

    monkeypatch.setattr(tt, "optimize_onnx", keep_unet)
    monkeypatch.setattr(tt, "_verify", record)
    out = tmp_path / "artifact"
    with pytest.raises(MissingDependencyError, match=r"needs 'tensorrt'.*sd-compiler\[tensorrt\].*engines=false"):
        compile_pipeline(  # without TensorRT: refused before any work, naming the way to the ONNX alone
            tiny_checkpoint("sd15"), recipe=[{"preset": preset, **SMALL}], target="tensorrt", output_dir=out
        )
    assert not out.exists() and not list(kept.iterdir())
    compile_artifact(  # engines=false: the Q/DQ export and the optimized graph, no TensorRT needed
        tiny_checkpoint("sd15"),
        recipe=[{"preset": preset, **SMALL}],
        target="tensorrt",
        output_dir=out,
        target_options={"engines": False},
        show_progress=False,
    )
    assert (out / "unet" / OPTIMIZED).is_file()

    model = onnx.load(str(kept / OPTIMIZED))
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", tt.QDQ_OPSET)}
    q_op, dq_op, domain = (
        ("QuantizeLinear", "DequantizeLinear", "")
        if preset == "int8"
        else ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "trt")
    )
    nodes = model.graph.node
    quantize = [n for n in nodes if n.op_type == q_op and n.domain == domain]
    dequantize = [n for n in nodes if n.op_type == dq_op and n.domain == domain]
    assert len(quantize) == len(dequantize) > 0
    weights = {t.name: t for t in model.graph.initializer}
    assert sum(n.input[0] in weights for n in quantize) == len(quantize) // 2  # each layer's weight Q/DQ kept
    scales = {weights[n.input[1]].data_type for n in quantize if n.input[1] in weights}
    assert scales == {onnx.TensorProto.FLOAT16}  # strongly typed: the scales in the graph's own type
    if preset == "fp8":
        assert "trt:: ops" in verified["unet"]["skipped"]
        return
    assert verified["unet"]["sqnr_db"] > 10.0  # ONNX Runtime runs the Q/DQ graph
    first = (kept / OPTIMIZED).read_bytes()
    compile_artifact(  # seeded end to end: a second compile exports the same bytes
        tiny_checkpoint("sd15"),
        recipe=[{"preset": preset, **SMALL}],
        target="tensorrt",
        output_dir=tmp_path / "again",
        target_options={"engines": False, "verify": False},
        show_progress=False,
    )
    assert (kept / OPTIMIZED).read_bytes() == first
