"""`int8` / `fp8` with target torch: modelopt's calibrated U-Net deployed as INT8 / FP8 layers (passes.ptq_lowp).

Oracles: modelopt's own fake-quantized U-Net, calibrated exactly as the compile calibrates (same config, seed,
inputs): every deployed layer reproduces its fake-quant layer on the inputs that layer sees in a real forward
(max error / max output: ~1e-7 measured, floor 1e-5), and the whole deployed U-Net is as close to the float one as
the simulation is; the artifact holds the same codes and scales bit for bit, int8 / float8_e4m3fn weights in a
file at most 0.35x the fp32 torch artifact's, and a loaded U-Net's forward dispatches `aten._int_mm` /
`aten._scaled_mm` once per quantized layer (a layer that dequantizes and runs a float matmul fails that).
The kernels' own arithmetic is in tests/unit/test_lowp.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (the [modelopt] extra)")

from sdcompiler.errors import PassError  # noqa: E402
from sdcompiler.kernels.lowp import multiplier, quantize  # noqa: E402
from sdcompiler.passes import PassContext, get_pass  # noqa: E402
from sdcompiler.passes.accounting import unet_example_inputs  # noqa: E402
from sdcompiler.passes.ptq_lowp import LowpConv2d, LowpLinear, lowp_modules  # noqa: E402
from sdcompiler.passes.training import sqnr_db  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = {"calib_prompts": 1, "calib_steps": 2, "resolution": 128}
GEMM = {"int8": "_int_mm", "fp8": "_scaled_mm"}


def _recipe(precision):
    return [{"pass": "ptq", "precision": precision, **SMALL}]


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    """precision -> (float U-Net, modelopt's fake-quant U-Net, deployed U-Net): the pass as the compile runs it."""
    from sdcompiler.loading import load_checkpoint

    made = {}

    def get(precision):
        if precision not in made:
            loaded = load_checkpoint(tiny_checkpoint("sd15"))
            pipe = loaded.pipeline
            reference = copy.deepcopy(pipe.unet).eval()
            ptq = get_pass("ptq")
            config = ptq.config_class.from_dict({"precision": precision, **SMALL}, owner="ptq")
            ctx = PassContext(
                arch="sd15",
                macs_resolution=(128, 128),
                cache_dir=tmp_path_factory.mktemp("ptq-cache"),  # its own: model_key "" must not meet others
                show_progress=False,
                target="torch",
            )
            ptq.requires(pipe, config, ctx)
            ptq.run(pipe, config, ctx)
            handed = ctx.products.unet_quantization
            deployed = copy.deepcopy(pipe.unet)
            smoothed = isinstance(handed.settings["algorithm"], dict)
            counts = lowp_modules(deployed, handed.layers, precision, smoothed)
            assert counts == {kind: sum(k == kind for k in handed.layers.values()) for kind in ("conv", "linear")}
            made[precision] = reference, pipe.unet, deployed.eval(), handed
        return made[precision]

    return get


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = unet_example_inputs(unet, 2, (16, 16))
    inputs = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in inputs.items()}
    inputs["timestep"] = torch.tensor([600, 600])
    return inputs


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_each_layer_reproduces_modelopts_fake_quant(calibrated, precision):
    _, fake, deployed, handed = calibrated(precision)
    seen = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output stays
            seen.setdefault(name, (inputs[0], output))

        return hook

    hooks = [fake.get_submodule(name).register_forward_hook(record(name)) for name in handed.layers]
    with torch.no_grad():
        fake(**_inputs(fake))
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(handed.layers)
    worst, flipped, codes = 0.0, 0, 0
    for name, (x, expected) in seen.items():
        layer = deployed.get_submodule(name)
        assert isinstance(layer, LowpConv2d if handed.layers[name] == "conv" else LowpLinear), name
        with torch.no_grad():
            got = layer(x)
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        pre = fake.get_submodule(name).input_quantizer.pre_quant_scale
        if pre is None:
            worst = max(worst, error)
            continue
        # SmoothQuant's pre-scale is folded into the input multiplier (x * (pre * m) instead of modelopt's
        # (x * pre) * m): a product that lands within an ulp of a rounding tie may take the other code
        ours = quantize(x, layer.act_mult, layer.qweight.dtype).float()
        theirs = quantize(
            x * pre, multiplier(fake.get_submodule(name).input_quantizer.amax, layer.qweight.dtype), layer.qweight.dtype
        ).float()
        assert (ours - theirs).abs().max() <= (1 if precision == "int8" else 32), name  # one code (fp8: one ulp)
        flipped += int((ours != theirs).sum())
        codes += ours.numel()
    print(
        f"tiny sd15 {precision}: worst layer error / max output {worst:.2e}, {flipped} of {codes} smoothed codes moved"
    )
    assert worst < 1e-5  # measured 5.8e-7 (fp8): float summation order only
    assert flipped <= 1e-5 * codes  # measured 1 of 1,402,368 (int8; fp8 has no SmoothQuant)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_deployed_unet_is_as_close_to_float_as_the_simulation(calibrated, precision):
    reference, fake, deployed, _ = calibrated(precision)
    inputs = _inputs(reference, seed=1)
    with torch.no_grad():
        want = reference(**inputs).sample
        simulated = sqnr_db(want, fake(**inputs).sample)
        real = sqnr_db(want, deployed(**inputs).sample)
    print(f"tiny sd15 {precision}: eps SQNR vs float, simulation {simulated:.2f} dB, deployed {real:.2f} dB")
    # a flipped rounding tie propagates, so not equal; a wrong scale or code loses many dB
    assert abs(real - simulated) < 1.0 and real > 15.0


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_artifact_stores_the_codes_and_runs_the_low_precision_gemm(compiled, calibrated, precision):
    _, _, deployed, handed = calibrated(precision)
    artifact = compiled("sd15", "torch", _recipe(precision))
    manifest = json.loads((artifact.root / "manifest.json").read_text())
    stage = next(s for s in manifest["lowering"]["stages"] if s["name"] == "quantize_layers")
    counts = {kind: sum(k == kind for k in handed.layers.values()) for kind in ("conv", "linear")}
    assert stage["results"]["layers"] == counts
    gemm = f"torch.{GEMM[precision]}"
    assert stage["results"]["kernels"]["cpu"] == {f"im2col + {gemm}": counts["conv"], gemm: counts["linear"]}
    assert stage["results"]["low_precision_macs_share"] > 0.73  # 0.7396 on tiny SD1.5 at level 3

    unet = artifact.components.modules["unet"]
    stored, expected = unet.state_dict(), deployed.state_dict()
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():  # the same calibration, codes and scales, bit for bit
        assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), name
    assert {t.dtype for n, t in stored.items() if n.endswith("qweight")} == {
        torch.int8 if precision == "int8" else torch.float8_e4m3fn
    }

    fp32 = compiled("sd15", "torch", "none")
    weights = "unet/diffusion_pytorch_model.safetensors"
    ratio = (artifact.root / weights).stat().st_size / (fp32.root / weights).stat().st_size
    assert ratio <= 0.35  # 0.3475 measured (int8; fp8 the same bytes)

    from tests.unit.test_lowp import OpTrace

    inputs = _inputs(unet, seed=2)
    with OpTrace() as trace, torch.no_grad():
        got = unet(**inputs).sample
    assert trace.ops.count(GEMM[precision]) == len(handed.layers)
    with torch.no_grad():
        torch.testing.assert_close(got, deployed(**inputs).sample, rtol=0, atol=0)

    image = artifact(
        "a red square", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(torch.as_tensor(image.images)).all()


def test_torch_target_refusals(tiny_checkpoint, tmp_path):
    from sdcompiler import compile_pipeline

    with pytest.raises(PassError, match="level 4 quantizes attention itself") as info:
        compile_pipeline(
            tiny_checkpoint("sd15"),
            [{"pass": "ptq", "precision": "fp8", "level": 4, **SMALL}],
            "torch",
            tmp_path / "fp8-level4",
        )
    assert "\n" not in str(info.value)
    with pytest.raises(Exception, match="onnx") as info:
        compile_pipeline(
            tiny_checkpoint("sd15"),
            [{"pass": "ptq", "backend": "onnxruntime", **SMALL}],
            "torch",
            tmp_path / "ort-torch",
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "fp8-level4").exists() and not (tmp_path / "ort-torch").exists()
