"""ptq with `quantize_controlnets` (issue 19, item 2: ControlNets "quantized by the same pass when asked"): the
ControlNet of a compile becomes INT8 layers like the U-Net, calibrated on its own inputs along trajectories the
ControlNet pipeline sampled with synthetic control images.

Oracles, as for the U-Net (test_ptq_torch_target.py): modelopt's fake-quantized net, calibrated exactly as the
compile calibrates: every deployed layer reproduces its fake-quant layer on the inputs it sees in a real forward;
the artifact holds the same codes and scales bit for bit, in a file far smaller than the float net's, and the
loaded net's forward dispatches `aten._int_mm` once per quantized layer. End to end: the compiled pipeline's
images equal diffusers' `StableDiffusionControlNetPipeline` on the artifact's own modules (the quantized net
included), and the control image moves them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (the [modelopt] extra)")

from sdcompiler import compile_pipeline  # noqa: E402
from sdcompiler.errors import PassError  # noqa: E402
from sdcompiler.passes import PassContext, get_pass  # noqa: E402
from sdcompiler.passes.ptq import CONTROLNET_EXCLUDE  # noqa: E402
from sdcompiler.passes.ptq_lowp import LowpConv2d, LowpLinear, lowp_modules  # noqa: E402
from sdcompiler.passes.teacher_data import synthetic_control_images  # noqa: E402
from sdcompiler.testing import make_controlnet  # noqa: E402

SETTINGS = {"precision": "int8", "calib_prompts": 1, "calib_steps": 2, "resolution": 64}
PTQ = {"pass": "ptq", **SETTINGS}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint, tmp_path_factory):
    return make_controlnet(tmp_path_factory.mktemp("cn") / "net", tiny_checkpoint("sd15"), seed=0)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, controlnet, tmp_path_factory):
    """(fake-quant net, deployed net, what the pass handed the target, the pass's metrics, float U-Net, float net,
    fake-quant U-Net, calibration trajectories): the pass as the compile runs it, on a pipeline and net loaded
    here."""
    from tests.integration.test_controlnet_passes import run_pass_with_controlnet

    settings = {**SETTINGS, "quantize_controlnets": True}
    cache = tmp_path_factory.mktemp("ptq-cache")
    pipe, net, ctx, metrics, float_unet, float_net = run_pass_with_controlnet(
        "ptq", settings, tiny_checkpoint("sd15"), controlnet, cache
    )
    ptq = get_pass("ptq")
    config = ptq.config_class.from_dict(settings, owner="ptq")
    handed = ctx.products.unet_quantization
    deployed = copy.deepcopy(net)
    lowp_modules(deployed, handed.controlnet_layers["controlnet"], "int8", smoothed=True)
    calib, _ = ptq._trajectories(pipe, config, ctx, PTQ["resolution"])  # from the pass's cache
    return net, deployed.eval(), handed, metrics, float_unet, float_net, pipe.unet, calib


def _net_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([600, 600]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
        "controlnet_cond": synthetic_control_images(2, 64, np.random.default_rng(seed)),
    }


@pytest.mark.slow
def test_each_controlnet_layer_reproduces_modelopts_fake_quant(calibrated):
    fake, deployed, handed, metrics = calibrated[:4]
    layers = handed.controlnet_layers["controlnet"]
    assert len(layers) == metrics["controlnet_quantized_layers"] == 114  # tiny SD1.5 net at level 3
    assert not any(name.startswith(CONTROLNET_EXCLUDE) for name in layers)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))

        return hook

    hooks = [fake.get_submodule(name).register_forward_hook(record(name)) for name in layers]
    with torch.no_grad():
        fake(**_net_inputs(), return_dict=False)
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(layers)
    worst = {"conv": 0.0, "linear": 0.0}
    for name, (x, expected) in seen.items():
        kind = layers[name]
        layer = deployed.get_submodule(name)
        assert isinstance(layer, LowpConv2d if kind == "conv" else LowpLinear), name
        with torch.no_grad():
            worst[kind] = max(worst[kind], ((layer(x) - expected).abs().max() / expected.abs().max()).item())
    print(f"tiny sd15 ControlNet int8: worst layer error / max output {worst}")
    assert worst["conv"] < 1e-5  # measured 5.4e-7: float summation order only
    # linears: SmoothQuant's pre-scale folded into the input multiplier may move a code that lands within an ulp
    # of a rounding tie (one step of 127: < 8e-3); a dropped pre-scale or a wrong scale is off by far more
    assert worst["linear"] < 8e-3  # measured 5.4e-7 (no code moved)
    # the residuals and the whole pipeline's eps on held-out trajectories, fake-quant vs float
    assert metrics["controlnet_residual_sqnr_db"] > 27.0  # measured 29.33 dB
    assert metrics["sqnr_db"] > 23.0  # measured 25.58 dB


@pytest.mark.slow
def test_convolutions_are_calibrated_on_the_inputs_they_get_with_the_controlnet(calibrated):
    """Each quantized conv's activation range (max calibration) is the largest |input| it sees on the calibration
    trajectories: the float nets' on the synthetic control images, the float U-Net's fed the residuals of the
    quantized nets it will run with (a U-Net calibrated without residuals, or nets on other images, fails)."""
    fake_net, _, handed, _, float_unet, float_net, fake_unet, calib = calibrated
    assert calib.control is not None and calib.control.shape[:2] == (1, calib.samples.shape[1])
    seen = {}

    def record(key):
        def hook(module, inputs):
            seen[key] = max(seen.get(key, 0.0), inputs[0].abs().max().item())

        return hook

    convs = {("unet", n): (float_unet, fake_unet) for n, kind in handed.layers.items() if kind == "conv"} | {
        ("net", n): (float_net, fake_net)
        for n, kind in handed.controlnet_layers["controlnet"].items()
        if kind == "conv"
    }
    hooks = [
        module.get_submodule(n).register_forward_pre_hook(record((owner, n)))
        for (owner, n), (module, _) in convs.items()
    ]
    calib.residuals([float_net])  # the nets calibrate first, in float
    calib.eps(float_unet, controlnets=[fake_net])  # then the U-Net, fed by the quantized nets it will run with
    for hook in hooks:
        hook.remove()
    worst = max(
        abs(fake.get_submodule(n).input_quantizer.amax.item() - seen[(owner, n)]) / seen[(owner, n)]
        for (owner, n), (_, fake) in convs.items()
    )
    print(f"{len(convs)} convs: worst relative gap between amax and the hooked max |input| {worst:.2e}")
    assert worst < 1e-6  # measured 4.5e-7 (float32 rounding of amax)


@pytest.mark.slow
def test_compiled_quantized_controlnet_is_stored_run_in_int8_and_matches_diffusers(
    calibrated, tiny_checkpoint, controlnet, tmp_path, monkeypatch
):
    from tests.integration.test_controlnet_passes import (
        CONTROL_CALL,
        assert_matches_diffusers_and_steered,
        synthetic_control,
    )
    from tests.unit.test_lowp import OpTrace

    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    _, deployed, handed, metrics = calibrated[:4]
    pipe = compile_pipeline(
        tiny_checkpoint("sd15"),
        recipe=[{**PTQ, "quantize_controlnets": True}],
        target="torch",
        output_dir=tmp_path / "out",
        device="cpu",
        controlnet=controlnet,
        show_progress=False,
    )
    record = pipe.manifest["passes"][-1]
    assert record["notes"]["controlnets"].startswith("int8")
    assert record["notes"]["calibration_data"].startswith("text-to-image with 1 ControlNet(s)")
    assert record["metrics"]["controlnet_residual_sqnr_db"] == pytest.approx(metrics["controlnet_residual_sqnr_db"])
    stage = next(s for s in pipe.manifest["lowering"]["stages"] if s["name"] == "quantize_layers")
    assert stage["results"]["controlnets"] == {"controlnet": {"conv": 44, "linear": 70}}

    net = pipe.components.modules["controlnet"]
    stored, expected = net.state_dict(), deployed.state_dict()
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():  # the same calibration, codes and scales, bit for bit
        assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), name
    ratio = (pipe.root / "controlnet" / WEIGHTS).stat().st_size / (controlnet / WEIGHTS).stat().st_size
    print(f"tiny sd15 ControlNet int8 file / fp32 file: {ratio:.4f}")
    assert ratio <= 0.35  # measured 0.3357 (the float layers, biases and scales are the rest)

    with OpTrace() as trace, torch.no_grad():
        net(**_net_inputs(seed=1), return_dict=False)
    assert trace.ops.count("_int_mm") == len(handed.controlnet_layers["controlnet"])

    images = (synthetic_control(0), synthetic_control(1))
    assert_matches_diffusers_and_steered(pipe, CONTROL_CALL, images, "int8 with its ControlNet quantized")


def test_quantize_controlnets_without_a_controlnet_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    from sdcompiler.loading import load_checkpoint

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    ptq = get_pass("ptq")
    config = ptq.config_class.from_dict({**SETTINGS, "quantize_controlnets": True}, owner="ptq")
    ctx = PassContext(arch="sd15", macs_resolution=(64, 64), cache_dir=tmp_path, target="torch")
    with pytest.raises(PassError, match="quantize_controlnets is set but this compile has no ControlNet") as caught:
        ptq.requires(pipe, config, ctx)
    assert "\n" not in str(caught.value)


def test_synthetic_control_images_are_seeded_edge_maps():
    first = synthetic_control_images(3, 64, np.random.default_rng(0))
    again = synthetic_control_images(3, 64, np.random.default_rng(0))
    assert first.shape == (3, 3, 64, 64) and torch.equal(first, again)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first[:, 0], first[:, 2])  # grey edges: the same in every channel
    share = first[:, 0].mean(dim=(1, 2))
    assert ((share > 0.03) & (share < 0.4)).all(), share  # edges, not blank and not filled
    assert not torch.equal(first[0], first[1])


# --- ONNX Runtime's INT8 (target onnx) with a ControlNet ---------------------------------------------------------

ORT_SETTINGS = {"precision": "int8", "calib_prompts": 1, "calib_steps": 2, "resolution": 64}


@pytest.fixture(scope="module")
def onnx_int8(tiny_checkpoint, controlnet, tmp_path_factory):
    """(int8 onnx artifact, float onnx artifact), both with the ControlNet."""
    made = [
        compile_pipeline(
            tiny_checkpoint("sd15"),
            recipe=recipe,
            target="onnx",
            target_options={"vae_encoder": False},
            output_dir=tmp_path_factory.mktemp("ort") / name,
            device="cpu",
            controlnet=controlnet,
            show_progress=False,
        )
        for name, recipe in (("int8", [{"pass": "ptq", **ORT_SETTINGS}]), ("float", "none"))
    ]
    return tuple(made)


@pytest.mark.slow
def test_onnx_int8_unet_takes_the_residuals_calibrated_on_them(onnx_int8, tiny_checkpoint, controlnet, tmp_path):
    """The QDQ U-Net graph has the residual inputs, and each quantized Conv / Linear input's uint8 range is its
    [min, max] over the calibration inputs with the float net's residuals added, found here without the
    calibrator (hooks on the float torch U-Net fed the residuals along trajectories rebuilt in a fresh cache)."""
    import onnx

    from sdcompiler.loading import load_checkpoint, load_controlnet
    from sdcompiler.passes.onnx_export import MID_RESIDUAL
    from sdcompiler.passes.teacher_data import load_prompts, teacher_trajectories
    from tests.integration.test_ptq import assert_ranges_are_min_max, qdq_input_ranges

    int8, _ = onnx_int8
    record = int8.manifest["passes"][0]
    assert record["notes"]["controlnets"] == "float (quantize_controlnets: false)"
    print(f"tiny sd15 onnx int8 with a ControlNet: eps SQNR {record['metrics']['sqnr_db']:.2f} dB")
    assert record["metrics"]["sqnr_db"] > 24.5  # measured 25.46 dB
    graph = onnx.load(str(int8.root / "unet" / "model.onnx")).graph
    assert MID_RESIDUAL in {i.name for i in graph.input}
    recorded = qdq_input_ranges(graph)

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    net, _ = load_controlnet(controlnet)
    data = teacher_trajectories(
        pipe,
        load_prompts()[:1],
        steps=2,
        guidance=7.5,
        resolution=64,
        seed=0,
        cache_dir=tmp_path,
        model_key="independent",
        controlnets=[net],
        controlnets_key="independent",
    )
    unet = pipe.unet.eval()

    def run():
        for step, timestep in enumerate(data.timesteps):
            *down, mid = data.step_residuals([net], step)
            unet(
                data.samples[step],
                timestep,
                data.context,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            )

    assert_ranges_are_min_max(unet, recorded, run)


@pytest.mark.slow
def test_onnx_int8_with_a_controlnet_is_close_to_float_and_steered_by_the_image(onnx_int8):
    from tests.integration.test_controlnet_passes import synthetic_control

    int8, float_ = onnx_int8
    call = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=64, width=64)

    def images(pipe, seed):
        return pipe(
            "a red cube", image=synthetic_control(seed), generator=torch.Generator().manual_seed(0), **call
        ).images

    got, want = images(int8, 0), images(float_, 0)
    assert np.isfinite(got).all()
    psnr = 10 * np.log10(1.0 / max(float(((got - want) ** 2).mean()), 1e-12))
    print(f"tiny sd15 onnx int8 with a ControlNet vs the float onnx artifact: PSNR {psnr:.1f} dB")
    assert psnr > 40.0  # measured 41.2 dB
    other = images(int8, 1)
    assert np.abs(other - got).max() > 1e-3, "the control image changed nothing"


# --- the tensorrt target's Q/DQ U-Net with a ControlNet (engines=false: no TensorRT here) -------------------------


@pytest.mark.slow
def test_tensorrt_qdq_unet_takes_the_residuals(tiny_checkpoint, controlnet, tmp_path):
    """int8 for TensorRT with a ControlNet, up to the engine build (UNVERIFIED on TensorRT itself): the modelopt
    U-Net, calibrated with the residuals, exports as a Q/DQ graph with the residual inputs, and ONNX Runtime runs
    its optimized form fed the ControlNet graph's residuals close to the fake-quant torch U-Net (the target's
    verify step on its export inputs)."""
    import onnx

    from sdcompiler.artifact import read_manifest
    from sdcompiler.compile import compile_artifact
    from sdcompiler.passes.onnx_export import MID_RESIDUAL
    from sdcompiler.targets.tensorrt.build import OPTIMIZED

    root = compile_artifact(
        tiny_checkpoint("sd15"),
        recipe=[PTQ],
        target="tensorrt",
        output_dir=tmp_path / "artifact",
        target_options={"engines": False},
        controlnet=controlnet,
        show_progress=False,
    )
    manifest = read_manifest(root)
    assert manifest["passes"][0]["notes"]["calibration_data"].startswith("text-to-image with 1 ControlNet(s)")
    export, optimize = manifest["lowering"]["stages"][:2]
    assert export["settings"]["unet_quantization"]["sqnr_of"].endswith("fed by the ControlNets' residuals")
    graph = onnx.load(str(root / "unet" / OPTIMIZED), load_external_data=False).graph
    assert MID_RESIDUAL in {i.name for i in graph.input}
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 200
    verify = optimize["results"]["unet"]["verify"]
    print(f"tiny sd15 tensorrt int8 Q/DQ U-Net with residual inputs (ORT) vs torch: {verify['sqnr_db']:.2f} dB")
    assert verify["sqnr_db"] > 26.0  # measured 28.14 dB
