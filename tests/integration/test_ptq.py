"""Post-training quantization (`ptq`, presets `int8` / `fp8`): ONNX Runtime static INT8 on tiny SD1.5.

Oracles: the pass record's eps SQNR (> 25 dB on tiny; 25.97 dB measured), graph node checks (QDQ pairs,
uint8 activations, int8 per-channel 7-bit weights, the excluded layers in float), each activation range
against the min and max of that activation over all calibration inputs (found with forward hooks on the
float U-Net, not by the calibrator), images vs the float artifact's (PSNR > 42 dB; 43.4 dB measured),
byte-identical U-Nets from two compiles, one-line refusals that write nothing, and each calibration method
on a toy graph with the U-Net's interface (an outlier that min-max keeps in the range and the percentile
method clips). The floors sit near what is achieved so that a broken calibration fails them: fed 1 of its 8
inputs it gives 20.7 dB / 37.8 dB, fed latents scaled by 0.5 22.9 dB / 39.0 dB (tests/mutations/ptq_*.patch).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdcompiler.errors import ConfigError, LoweringError, RecipeError

# CPU-sized: 2 prompts x 2 steps (8 calibration inputs: both CFG halves) at the tiny model's native 128 px
# (the default resolution: the native size, at most 256)
SMALL = {"calib_prompts": 2, "calib_steps": 2}
RECIPE = [{"preset": "int8", **SMALL}]


@pytest.fixture(scope="module")
def int8(tiny_checkpoint, tmp_path_factory):
    from sdcompiler import compile_pipeline

    out = tmp_path_factory.mktemp("ptq") / "int8"
    return compile_pipeline(tiny_checkpoint("sd15"), recipe=RECIPE, target="onnx", output_dir=out, device="cpu")


def _unet_graph(pipe):
    import onnx

    return onnx.load(str(pipe.root / "unet" / "model.onnx"))


def test_record_has_sqnr_and_stages_name_the_settings(int8):
    manifest = int8.manifest
    (record,) = manifest["passes"]
    assert record["name"] == "ptq" and record["config"]["precision"] == "int8"
    assert record["params_after"] == record["params_before"]  # the torch U-Net is untouched
    metrics = record["metrics"]
    print(f"tiny sd15 int8: eps SQNR {metrics['sqnr_db']:.2f} dB on held-out trajectories")
    assert metrics["sqnr_db"] > 25.0  # achieved 25.97 dB
    assert metrics["calibration_inputs"] == 2 * SMALL["calib_prompts"] * SMALL["calib_steps"]
    assert metrics["excluded_nodes"] > 0
    assert metrics["resolution"] == 128  # the tiny model's native size, recorded
    stages = {s["name"]: s for s in manifest["lowering"]["stages"]}
    assert list(stages) == ["export_onnx", "quantize_onnx", "verify"]
    assert stages["export_onnx"]["results"]["unet"].startswith("replaced by")  # the float U-Net is not exported twice
    settings = stages["quantize_onnx"]["settings"]
    assert (settings["format"], settings["activation_type"], settings["weight_type"]) == ("QDQ", "uint8", "int8")
    assert settings["per_channel"] and settings["reduce_range"] and settings["calibration"] == "minmax"
    print(f"tiny sd15 int8: verify SQNR {stages['verify']['results']['unet']['sqnr_db']:.2f} dB on the export inputs")
    assert stages["verify"]["results"]["unet"]["sqnr_db"] > 23.0  # achieved 24.56 dB (random export inputs)


def test_unet_graph_is_qdq_with_uint8_activations_and_int8_per_channel_weights(int8):
    from onnx import TensorProto, numpy_helper

    graph = _unet_graph(int8).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(weights[n.input[2]].dtype == np.uint8 for n in quantize)  # activation zero points
    assert {i.type.tensor_type.elem_type for i in graph.input} == {TensorProto.FLOAT}  # float interface

    convs = [n for n in graph.node if n.op_type == "Conv"]
    for conv in convs:
        source = producer.get(conv.input[1])
        name = conv.name.split("/")[2]
        if name in ("conv_in", "conv_out"):  # excluded: float weights, no Q/DQ
            assert conv.input[1] in weights and weights[conv.input[1]].dtype == np.float32, conv.name
            continue
        assert source is not None and source.op_type == "DequantizeLinear", conv.name
        codes, scales = weights[source.input[0]], weights[source.input[1]]
        assert codes.dtype == np.int8 and scales.shape == (codes.shape[0],), conv.name  # per output channel
        assert np.abs(codes).max() <= 64, conv.name  # reduce_range: 7-bit symmetric, [-64, 64]
        assert producer[conv.input[0]].op_type == "DequantizeLinear", conv.name  # quantized activation
    assert sum(producer.get(c.input[1]) is not None for c in convs) == len(convs) - 2
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms and all("time_embedding" in n.name or "time_emb_proj" in n.name for n in gemms)
    assert all(n.input[1] in weights for n in gemms)  # the time embedding path stays float


def qdq_input_ranges(graph) -> dict[str, tuple[float, int]]:
    """Module path -> (scale, zero point) of the QuantizeLinear on the input of each quantized Conv / MatMul /
    Gemm of a QDQ graph."""
    from onnx import numpy_helper

    from sdcompiler.passes.ptq import module_path

    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    recorded = {}
    for node in graph.node:
        source = producer.get(node.input[0])
        if node.op_type in ("Conv", "MatMul", "Gemm") and source is not None and source.op_type == "DequantizeLinear":
            quantize = producer[source.input[0]]
            recorded[module_path(node.name)] = (float(weights[quantize.input[1]]), int(weights[quantize.input[2]]))
    return recorded


def assert_ranges_are_min_max(unet, recorded: dict, run) -> None:
    """Each recorded (scale, zero point) of a Conv / Linear of `unet` is ONNX Runtime's uint8 range of the
    [min, max] its input takes while `run()` calls `unet` (found by forward pre-hooks, not the calibrator)."""
    observed = {}

    def observe(name):
        def hook(module, args):
            low, high = observed.get(name, (0.0, 0.0))  # quantization ranges always hold 0
            observed[name] = (min(low, args[0].min().item()), max(high, args[0].max().item()))

        return hook

    modules = dict(unet.named_modules())
    layers = [n for n in recorded if isinstance(modules.get(n), (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    assert len(layers) > 200  # every quantized Conv / Linear input (the attention's own MatMuls have no module)
    for name in layers:
        (low, high), (scale, zero) = observed[name], recorded[name]
        # ONNX Runtime's uint8 range: scale = (max - min) / 255, zero point = round(-min / scale)
        assert scale == pytest.approx((high - low) / 255, rel=1e-4), name
        assert abs(zero + low / scale) <= 0.5 + 1e-3, name


def test_activation_ranges_are_the_min_max_over_every_calibration_input(int8, tiny_checkpoint, tmp_path):
    """minmax: each quantized Conv / Linear input's (scale, zero point) in the graph is its [min, max] over all 8
    calibration inputs, found here without the calibrator: forward pre-hooks on the float torch U-Net run on the
    same teacher trajectories, rebuilt in a fresh cache. A calibrator fed fewer inputs or altered ones misses it."""

    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes.ptq import PtqConfig, calibration_resolution
    from sdcompiler.passes.teacher_data import load_prompts, teacher_trajectories

    recorded = qdq_input_ranges(_unet_graph(int8).graph)

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    config = PtqConfig(**SMALL)
    data = teacher_trajectories(
        pipe,
        load_prompts()[: config.calib_prompts],
        steps=config.calib_steps,
        guidance=config.guidance_scale,
        resolution=calibration_resolution(config, pipe),
        seed=0,  # compile_pipeline's default seed
        cache_dir=tmp_path,
        model_key="independent",
    )
    assert data.samples.shape[:2] == (2, 4)  # 2 steps x (2 prompts x 2 CFG halves): the 8 calibration inputs
    unet = pipe.unet.eval()

    def run():
        for step, timestep in enumerate(data.timesteps):
            unet(data.samples[step], timestep, data.context)

    assert_ranges_are_min_max(unet, recorded, run)


def test_generates_images_close_to_the_float_artifact(int8, compiled):
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    got = int8("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    ref = compiled("sd15")("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == ref.shape and np.isfinite(got).all()
    psnr = 10 * np.log10(1.0 / max(float(((got - ref) ** 2).mean()), 1e-12))
    print(f"tiny sd15 int8 vs float ONNX artifact: PSNR {psnr:.1f} dB")
    assert psnr > 42.0  # achieved 43.4 dB


def test_two_compiles_give_the_same_unet_bytes(int8, tiny_checkpoint, tmp_path, monkeypatch):
    from sdcompiler.compile import compile_artifact

    # a fresh cache: trajectories, export, calibration and quantization all run again
    monkeypatch.setenv("SDCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    root = compile_artifact(
        tiny_checkpoint("sd15"),
        recipe=RECIPE,
        target="onnx",
        output_dir=tmp_path / "again",
        target_options={"verify": False},
    )
    files = json.loads((root / "manifest.json").read_text())["files"]
    assert files["unet/model.onnx"] == int8.manifest["files"]["unet/model.onnx"]


def test_fp8_is_refused_for_onnx_before_writing(tiny_checkpoint, tmp_path):
    from sdcompiler import compile_pipeline

    out = tmp_path / "fp8"
    # refused from the recipe alone: the path does not even have to be a checkpoint
    with pytest.raises(LoweringError, match=r"'ptq'.*tensorrt.*target='tensorrt'") as info:
        compile_pipeline(tmp_path / "not-loaded", recipe="fp8", target="onnx", output_dir=out)
    assert "\n" not in str(info.value)
    assert not out.exists()  # (fp8 for target tensorrt: test_ptq_modelopt.py)


def test_onnxruntime_backend_with_target_torch_is_refused_up_front(tiny_checkpoint, tmp_path):
    """ORT's U8 QDQ graph runs on ONNX Runtime only; `int8` with target torch runs the modelopt backend instead
    (tests/integration/test_ptq_torch_target.py)."""
    from sdcompiler import compile_pipeline

    out = tmp_path / "torch"
    with pytest.raises(LoweringError, match=r"'ptq'.*target='onnx'") as info:
        compile_pipeline(
            tmp_path / "not-loaded",
            recipe=[{"preset": "int8", "backend": "onnxruntime"}],
            target="torch",
            output_dir=out,
        )
    assert "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "item, error",
    [
        ({"pass": "ptq", "calib_prompt": 2}, ConfigError),  # unknown key
        ({"pass": "ptq", "calibration": "kl"}, ConfigError),
        ({"pass": "ptq", "precision": "int4"}, ConfigError),
        ({"pass": "ptq", "percentile": 20.0}, ConfigError),
        ({"pass": "ptq", "guidance_scale": 1.0}, ConfigError),
        ({"pass": "ptq", "op_types": []}, ConfigError),
        ({"preset": "int8", "levels": 3}, RecipeError),  # not a key of the preset's pass
    ],
)
def test_bad_configs_are_rejected(item, error):
    from sdcompiler.recipe import resolve_recipe

    with pytest.raises(error) as info:
        resolve_recipe([item])
    assert "\n" not in str(info.value)


def test_exclude_patterns_match_module_scopes():
    from types import SimpleNamespace

    from sdcompiler.passes.ptq import excluded_nodes, module_path

    assert module_path("/unet/down_blocks.0/resnets.0/conv1/Conv") == "down_blocks.0.resnets.0.conv1"
    names = [
        "/unet/conv_in/Conv",
        "/unet/time_embedding/linear_1/Gemm",
        "/unet/down_blocks.0/resnets.0/time_emb_proj/Gemm",
        "/unet/down_blocks.0/resnets.0/conv1/Conv",
        "/unet/conv_norm_out/InstanceNormalization",
        "Constant_3",
    ]
    model = SimpleNamespace(graph=SimpleNamespace(node=[SimpleNamespace(name=n) for n in names]))
    assert excluded_nodes(model, ("conv_in", "time_embedding", "*.time_emb_proj")) == names[:3]


class _ToyUNet(torch.nn.Module):
    """The U-Net's graph interface around two convs and a linear: calibration methods in a second."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.proj = (
            torch.nn.Conv2d(4, 16, 3, padding=1),
            torch.nn.Conv2d(16, 4, 1),
            torch.nn.Linear(32, 16),
        )

    def forward(self, sample, timestep, encoder_hidden_states):
        context = self.proj(encoder_hidden_states).mean(1)[:, :, None, None]
        return self.conv2(torch.relu(self.conv1(sample) + context)) * (timestep / 1000.0)


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
def test_calibration_methods(calibration, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from sdcompiler.passes.ptq import PtqConfig, quantize_unet
    from sdcompiler.passes.teacher_data import Trajectories
    from sdcompiler.passes.training import sqnr_db

    generator = torch.Generator().manual_seed(0)
    data = Trajectories(
        samples=torch.randn(2, 3, 4, 16, 16, generator=generator),
        timesteps=torch.tensor([900.0, 300.0]),
        context=torch.randn(3, 77, 32, generator=generator),
    )
    data.samples[0, 0, 0, 0, 0] = 40.0  # one outlier in 6144 values: min-max keeps it, the 99.9th percentile not
    model = _ToyUNet().eval()
    args = (data.samples[1, :1], data.timesteps[1], data.context[:1])
    torch.onnx.export(
        model,
        args,
        str(tmp_path / "float.onnx"),
        dynamo=False,
        opset_version=18,
        input_names=["sample", "timestep", "encoder_hidden_states"],
        output_names=["out_sample"],
    )
    config = PtqConfig(calibration=calibration, percentile=99.9, exclude=())
    settings = quantize_unet(tmp_path / "float.onnx", tmp_path / "int8.onnx", data, config)
    assert settings["calibration"] == calibration and settings["calibration_inputs"] == 6

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sample_q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "sample")
    sample_scale = float(weights[sample_q.input[1]])
    if calibration != "entropy":  # ORT's entropy search has 128 bins over the whole range: it may keep the outlier
        assert (sample_scale > 40.0 / 255) == (calibration == "minmax")
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    inputs = {"sample": args[0].numpy(), "timestep": args[1].numpy(), "encoder_hidden_states": args[2].numpy()}
    with torch.no_grad():
        assert sqnr_db(model(*args), torch.from_numpy(session.run(None, inputs)[0])) > 15.0
