"""quest_w4a4 with ControlNets (issue 19, item 2): the U-Net calibrated along trajectories the ControlNet pipeline
sampled with synthetic control images, fed the nets' residuals; with `quantize_controlnets` the nets get the same
scheme (packed 4-bit layers, time-wise activation scales), calibrated first on their own inputs.

Oracles, as for the U-Net (test_quest_compile.py): the fake-quant net of the same pass run in memory (deterministic
by seed): the artifact stores exactly what packing it gives, bit for bit, and reloads it so; its packed layers
compute the fake-quant layers' outputs on the inputs they see in a real forward. The time-wise scales are MSE
searches over clip levels of the largest |input| each quantizer sees per calibrated timestep (`search_act_scale`:
`absmax (1 - 0.7 i / grid) / (2^(b-1) - 1)`), so each scale sits on the grid of the maximum the hooks see, the
U-Net's fed by the quantized net. End to end: the compiled pipeline's images equal diffusers'
`StableDiffusionControlNetPipeline` on the artifact's own modules (the packed net included), and the control image
moves them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PassError
from sdcompiler.passes import PassContext, get_pass
from sdcompiler.passes.quest import pack_quantized
from sdcompiler.passes.quest.modules import (
    CONTROLNET_FIRST_LAST,
    PackedQuantConv2d,
    PackedQuantLinear,
    QuantConv2d,
    QuantLinear,
    quantized_layers,
)
from sdcompiler.passes.teacher_data import synthetic_control_images, take_prompts, teacher_trajectories
from sdcompiler.testing import make_controlnet

# CPU-sized: 1 calibration and 1 held-out prompt, 2 steps at 64 px, no finetuning, a 4-point range search
SETTINGS = {
    "calib_prompts": 1,
    "held_out_prompts": 1,
    "calib_steps": 2,
    "resolution": 64,
    "finetune": False,
    "search_grid": 4,
}
QUEST = {"pass": "quest_w4a4", **SETTINGS, "quantize_controlnets": True}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint, tmp_path_factory):
    return make_controlnet(tmp_path_factory.mktemp("cn") / "net", tiny_checkpoint("sd15"), seed=0)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, controlnet, tmp_path_factory):
    """(fake-quant net, fake-quant U-Net, the pass's metrics, float U-Net, float net, calibration trajectories):
    the pass as the compile runs it, on a pipeline and net loaded here."""
    from tests.integration.test_controlnet_passes import run_pass_with_controlnet

    cache = tmp_path_factory.mktemp("quest-cache")
    settings = {**SETTINGS, "quantize_controlnets": True}
    pipe, net, ctx, metrics, float_unet, float_net = run_pass_with_controlnet(
        "quest_w4a4", settings, tiny_checkpoint("sd15"), controlnet, cache
    )
    quest = get_pass("quest_w4a4")
    config = quest.config_class.from_dict(settings, owner="quest_w4a4")
    calib = teacher_trajectories(  # from the pass's cache
        pipe,
        take_prompts(config, "calib_prompts")[: config.calib_prompts],
        steps=config.calib_steps,
        guidance=config.guidance_scale,
        resolution=SETTINGS["resolution"],
        seed=ctx.seed,
        cache_dir=ctx.cache_dir,
        model_key=ctx.model_key,
        controlnets=[net],
        controlnets_key=ctx.controlnets_key,
    )
    return net, pipe.unet, metrics, float_unet, float_net, calib


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, controlnet, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
        pipe = compile_pipeline(
            tiny_checkpoint("sd15"),
            recipe=[QUEST],
            target="torch",
            output_dir=tmp_path_factory.mktemp("quest") / "out",
            device="cpu",
            controlnet=controlnet,
            show_progress=False,
        )
        yield pipe


def _net_inputs(seed=0, timestep=600):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([timestep, timestep]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
        "controlnet_cond": synthetic_control_images(2, 64, np.random.default_rng(seed)),
    }


@pytest.mark.slow
def test_stored_controlnet_is_the_packed_fake_quant_net_and_computes_its_layers(calibrated, artifact, controlnet):
    fake, _, metrics = calibrated[:3]
    record = artifact.manifest["passes"][-1]
    assert record["notes"]["controlnets"].startswith("W4A4")
    assert record["notes"]["calibration_data"].startswith("text-to-image with 1 ControlNet(s)")
    assert record["metrics"]["controlnet_residual_sqnr_db"] == pytest.approx(metrics["controlnet_residual_sqnr_db"])
    layers = dict(quantized_layers(fake))
    assert (
        len(layers) == metrics["controlnet_quantized_layers"] == 140
    )  # the tiny net's linears / convs but its time embedding's
    assert {name for name, layer in layers.items() if layer.w_bits == 8} == {
        n for n in layers if any(n == p or n.startswith(p + ".") for p in CONTROLNET_FIRST_LAST)
    }
    stage = {s["name"]: s for s in artifact.manifest["lowering"]["stages"]}["save_weights"]
    assert stage["results"]["controlnet_packed_quantized_layers"] == {"controlnet": 140}

    # the artifact holds what packing the in-memory net gives, bit for bit, and a fresh load reads it back so
    expected = pack_quantized_copy(fake).state_dict()
    net = artifact.components.modules["controlnet"]
    reloaded = load_compiled(artifact.root).components.modules["controlnet"]
    for stored in (net.state_dict(), reloaded.state_dict()):
        assert stored.keys() == expected.keys()
        for name, tensor in expected.items():
            assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), name
    packed = [m for m in net.modules() if isinstance(m, (PackedQuantLinear, PackedQuantConv2d))]
    assert len(packed) == 140 and not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in net.modules())
    ratio = (artifact.root / "controlnet" / WEIGHTS).stat().st_size / (controlnet / WEIGHTS).stat().st_size
    print(f"tiny sd15 ControlNet W4A4 file / fp32 file: {ratio:.4f}")
    assert ratio <= 0.18  # measured 0.1745 (8-bit ends, time embedding, biases, norms and scales are the rest)

    # each packed layer computes its fake-quant layer on the inputs it sees in a real forward
    seen = {}

    def record_io(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))

        return hook

    hooks = [layer.register_forward_hook(record_io(name)) for name, layer in layers.items()]
    inputs = _net_inputs()
    with torch.no_grad():
        fake_down, fake_mid = fake(**inputs, return_dict=False)
        got_down, got_mid = net(**inputs, return_dict=False)  # sets the packed net's timestep too
        fake.quant_state.enabled = False
        float_down, float_mid = fake(**inputs, return_dict=False)
        fake.quant_state.enabled = True
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(layers)
    worst = 0.0
    with torch.no_grad():
        for name, (x, want) in seen.items():
            worst = max(worst, ((net.get_submodule(name)(x) - want).abs().max() / want.abs().max()).item())
    print(f"tiny sd15 ControlNet W4A4: worst packed layer error / max output {worst:.2e}")
    assert worst < 1e-5  # measured 4.2e-7: the same integers, float summation order only
    # the whole net: the same integers up to summation order (a flip at an exact .5 may propagate), far below the
    # quantization error
    fake_all = torch.cat([r.flatten() for r in (*fake_down, fake_mid)])
    got_all = torch.cat([r.flatten() for r in (*got_down, got_mid)])
    float_all = torch.cat([r.flatten() for r in (*float_down, float_mid)])
    mismatch = (got_all - fake_all).abs().max().item()
    assert mismatch < 1e-2 * fake_all.abs().max().item()
    assert mismatch < 0.05 * (float_all - fake_all).abs().max().item()
    print(
        f"held-out residual SQNR {metrics['controlnet_residual_sqnr_db']:.2f} dB, eps SQNR {metrics['sqnr_db']:.2f} dB "
        f"(RTN {metrics['sqnr_rtn_db']:.2f} dB)"
    )
    assert metrics["controlnet_residual_sqnr_db"] > 13.5  # measured 15.12 dB
    assert metrics["sqnr_db"] > 8.5  # measured 9.68 dB: the W4A4 U-Net fed by the W4A4 net, vs both float
    assert metrics["sqnr_calibrated_db"] >= metrics["sqnr_rtn_db"] + 3  # measured 9.68 vs 5.80 dB


def pack_quantized_copy(fake):
    packed = copy.deepcopy(fake)
    pack_quantized(packed)
    return packed


@pytest.mark.slow
def test_timewise_scales_are_searched_on_the_inputs_each_layer_gets_with_the_controlnet(calibrated):
    """Every (unsplit) quantizer's scale at calibrated step i is `absmax_i * r / (2^(b-1) - 1)` with r on the
    search grid, absmax_i the largest |input| its layer sees at step i: the float net's on the synthetic control
    images, the float U-Net's fed the residuals of the quantized net it will run with (a U-Net calibrated without
    residuals, or a net on other images, is off the grid)."""
    fake_net, fake_unet, _, float_unet, float_net, calib = calibrated
    assert calib.control is not None and calib.control.shape[:2] == (1, calib.samples.shape[1])
    steps = len(calib.timesteps)
    seen, current = {}, {"step": 0}

    def record(key):
        def hook(module, inputs):
            values = seen.setdefault(key, [0.0] * steps)
            values[current["step"]] = max(values[current["step"]], inputs[0].abs().max().item())

        return hook

    layers = {
        (owner, name): (float_model, layer)
        for owner, float_model, fake in (("unet", float_unet, fake_unet), ("net", float_net, fake_net))
        for name, layer in quantized_layers(fake)
        if not getattr(layer, "split", 0)
    }
    hooks = [model.get_submodule(n).register_forward_pre_hook(record((o, n))) for (o, n), (model, _) in layers.items()]
    rows = torch.arange(calib.samples.shape[1])
    with torch.no_grad():
        for step in range(steps):
            current["step"] = step
            inputs = calib.inputs(torch.tensor(step), rows)
            calib.residual_kwargs([float_net], inputs)  # the net calibrates first, in float
            float_unet(**inputs, **calib.residual_kwargs([fake_net], inputs))  # the U-Net, fed by the quantized net
    for hook in hooks:
        hook.remove()
    grid, worst = SETTINGS["search_grid"], 0.0
    for key, (_, layer) in layers.items():
        top = 2 ** (layer.act.bits - 1) - 1
        for step in range(steps):
            ratio = layer.act.scale[step].item() * top / seen[key][step]  # the clip level / absmax
            position = (1.0 - ratio) * grid / 0.7  # an integer in [0, grid) on the search grid
            assert -1e-3 < position < grid, (key, step, ratio)
            worst = max(worst, abs(position - round(position)))
    print(f"{len(layers)} layers x {steps} steps: worst distance of scale * top / absmax from the grid {worst:.2e}")
    assert worst < 1e-4  # measured 4.6e-6 (float32 rounding of the scales and of the hooked maxima)


@pytest.mark.slow
def test_finetuning_with_the_controlnet_trains_the_unet_only(calibrated, tiny_checkpoint, controlnet, tmp_path):
    """Selective finetuning runs fed by the nets (float nets for the teacher, the quantized ones for the student)
    and leaves the nets exactly as calibrated: the same net as the run without finetuning, bit for bit."""
    from tests.integration.test_controlnet_passes import run_pass_with_controlnet

    tuned = {**SETTINGS, "finetune": True, "stage1_steps": 2, "stage2_steps": 2, "batch_size": 2}
    _, net, _, metrics, _, _ = run_pass_with_controlnet(
        "quest_w4a4", {**tuned, "quantize_controlnets": True}, tiny_checkpoint("sd15"), controlnet, tmp_path
    )
    print(
        f"finetuned with the ControlNet: calibrated {metrics['sqnr_calibrated_db']:.2f} dB -> finetuned "
        f"{metrics['sqnr_finetuned_db']:.2f} dB (kept {metrics['finetune_kept']:.0f})"
    )
    assert metrics["stage1_loss_last"] > 0 and metrics["stage2_loss_last"] > 0
    deployed = metrics["sqnr_finetuned_db"] if metrics["finetune_kept"] else metrics["sqnr_calibrated_db"]
    assert metrics["sqnr_db"] == deployed
    assert metrics["sqnr_calibrated_db"] == pytest.approx(calibrated[2]["sqnr_calibrated_db"])
    expected = calibrated[0].state_dict()
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_compiled_pipeline_with_its_quantized_controlnet_matches_diffusers(artifact, monkeypatch):
    from tests.integration.test_controlnet_passes import (
        CONTROL_CALL,
        assert_matches_diffusers_and_steered,
        synthetic_control,
    )

    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    images = (synthetic_control(0), synthetic_control(1))
    assert_matches_diffusers_and_steered(artifact, CONTROL_CALL, images, "quest-w4a4 with its ControlNet quantized")


def test_quantize_controlnets_without_a_controlnet_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    from sdcompiler.loading import load_checkpoint

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    quest = get_pass("quest_w4a4")
    config = quest.config_class.from_dict({**SETTINGS, "quantize_controlnets": True}, owner="quest_w4a4")
    ctx = PassContext(arch="sd15", macs_resolution=(64, 64), cache_dir=tmp_path, target="torch")
    with pytest.raises(PassError, match="quantize_controlnets is set but this compile has no ControlNet") as caught:
        quest.requires(pipe, config, ctx)
    assert "\n" not in str(caught.value) and "controlnet=PATH" in str(caught.value)
