"""The ptq pass's modelopt backend (target tensorrt): INT8 / FP8 Q/DQ on tiny SD1.5, up to the engine build.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_ptq_modelopt_compile.py.

Oracles: which layers each TensorRT-demo quantization level gives quantizers (by module type and name),
calibrated ranges on every enabled quantizer, SmoothQuant's per-channel input scales, the eps SQNR of
the fake-quantized U-Net (> 15 dB on tiny; ~31 dB int8, ~25 dB fp8 measured), identical ranges from
two runs, the percentile calibrator against `torch.quantile`, and the exported optimized graph: Q/DQ
pairs (standard for int8, `trt::` for fp8) with scales in the graph's fp16, weight Q/DQ not folded away,
opset 19, then the one-line error naming the [tensorrt] extra and no artifact.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (the [modelopt] extra)")

from sdcompiler.passes import get_pass  # noqa: E402
from sdcompiler.passes import ptq_modelopt as mo  # noqa: E402


def _pipeline(tiny_checkpoint, arch="sd15"):
    from sdcompiler.loading import load_checkpoint

    return load_checkpoint(tiny_checkpoint(arch)).pipeline


def test_levels_follow_the_tensorrt_demo(tiny_checkpoint):
    unet = _pipeline(tiny_checkpoint).unet
    levels = {level: mo.selected_layers(unet, level, mo.DEFAULT_EXCLUDE) for level in (1.0, 2.0, 2.5, 3.0)}
    convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    excluded = {
        n
        for n in convs | linears
        if n.startswith(("time_embedding", "conv_in", "conv_out")) or n.endswith(("time_emb_proj", "conv_shortcut"))
    }
    assert excluded and {n for n in excluded if n.endswith("conv_shortcut")}
    assert set(levels[1.0]) == convs - excluded and set(levels[1.0].values()) == {"conv"}
    feed_forward = {n for n in linears if ".ff.net." in n}
    qkv = {
        n
        for n in linears
        if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"))
    }
    assert feed_forward and qkv
    assert set(levels[2.0]) == set(levels[1.0]) | feed_forward
    assert set(levels[2.5]) == set(levels[2.0]) | qkv
    assert set(levels[3.0]) == (convs | linears) - excluded  # every other linear: attention outputs, ...
    assert any(n.endswith("to_out.0") for n in levels[3.0])

    from sdcompiler.passes.fuse_qkv import fuse_attention_projections

    fuse_attention_projections(unet, self_attention=True, cross_attention=True)  # the fuse_qkv pass's layout
    fused = {n for n, k in mo.selected_layers(unet, 2.5, mo.DEFAULT_EXCLUDE).items() if k == "linear"}
    assert {n.rsplit(".", 1)[0] + ".to_qkv" for n in qkv if ".attn1." in n} <= fused
    assert {n.rsplit(".", 1)[0] + ".to_kv" for n in qkv if ".attn2." in n} <= fused


def test_percentile_calibrator_matches_torch_quantile():
    cls, args, kwargs = mo.make_percentile_calibrator(99.0)
    calibrator = cls(8, None, False, *args, **kwargs)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1000, generator=generator) * scale for scale in (1.0, 3.0, 2.0)]
    for batch in batches:
        calibrator.collect(batch)
    expected = max(torch.quantile(b.abs().flatten(), 0.99, interpolation="higher") for b in batches)
    assert torch.isclose(calibrator.compute_amax(), expected)
    assert calibrator.compute_amax() < max(b.abs().max() for b in batches)  # the outliers are clipped
    calibrator.reset()
    assert calibrator.compute_amax() is None


@pytest.mark.parametrize(
    "options, match",
    [
        ({"level": 4.0}, "level 4 quantizes attention"),
        ({"level": 5.0}, "level must be one of 1, 2, 2.5, 3, 4"),
        ({"precision": "fp8", "backend": "onnxruntime"}, "ONNX Runtime cannot load"),
        ({"smoothquant_alpha": 1.5}, "smoothquant_alpha must be in"),
    ],
)
def test_invalid_settings_are_one_line_errors(options, match):
    with pytest.raises(Exception, match=match) as info:
        get_pass("ptq").config_class.from_dict(options, owner="ptq")
    assert "\n" not in str(info.value)
