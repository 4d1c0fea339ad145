"""The ptq pass's modelopt backend: a fake-quantized U-Net that the tensorrt target exports as a Q/DQ graph.

`nvidia-modelopt` (`mtq.quantize`) replaces every quantized `nn.Conv2d` / `nn.Linear` with a module that
carries an input and a weight `TensorQuantizer`, calibrates their ranges (amax) with a forward loop over
the teacher's own sampling trajectories, and, under the TorchScript ONNX exporter, writes each quantizer
as a Q/DQ pair: standard `QuantizeLinear` / `DequantizeLinear` for INT8, `trt::TRT_FP8QuantizeLinear` /
`trt::TRT_FP8DequantizeLinear` for FP8 (only TensorRT loads those). TensorRT's strongly typed builder turns
each Q/DQ-wrapped op into an INT8 / FP8 kernel.

Schemes (TensorRT's: symmetric, no zero points):
- int8: weights per output channel, activations per tensor; SmoothQuant (`smoothquant_alpha`, 0.8 as
  modelopt's SDXL example; null: plain max calibration) moves activation outliers of the linear layers
  into their weights; `calibration: percentile` takes conv input ranges from `PercentileCalibrator`.
- fp8: E4M3 weights and activations, one scale per tensor, max calibration.

Quantization levels (TensorRT demo's `--quantization-level`; which layers get Q/DQ):
  1    convolutions
  2    + the transformer feed-forward linears (`ff.net.*`)
  2.5  + the attention q/k/v projections
  3    + every other linear (attention outputs, linear `proj_in` / `proj_out`)
  4    + attention itself: Q, K, V (and the softmax of the bmm path) in FP8, fused FP8 MHA (fp8 only)
`exclude` keeps modules in float at every level (default: the time and added embeddings, `time_emb_proj`,
`conv_in`, `conv_out` and the ResNet shortcut convs, as modelopt's diffusers example does).

The pass's `sqnr_db` is the eps SQNR of the fake-quantized torch U-Net against the float one on held-out
trajectories: the simulation that the exported graph encodes, not a TensorRT engine's output (no machine
here runs TensorRT).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from typing import Any, Callable, Iterable

import torch

MODELOPT_LEVELS = (1.0, 2.0, 2.5, 3.0, 4.0)
DEFAULT_EXCLUDE = ("time_embedding", "add_embedding", "*.time_emb_proj", "conv_in", "conv_out", "*.conv_shortcut")
QKV = ("to_q", "to_k", "to_v", "to_qkv", "to_kv")  # the last two: after the fuse_qkv pass


def module_excluded(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name`, or a module containing it, matches one of the glob `patterns`."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def selected_layers(unet: torch.nn.Module, level: float, exclude: Iterable[str]) -> dict[str, str]:
    """The layers a quantization level gives Q/DQ: module name -> "conv" | "linear"."""
    exclude = tuple(exclude)
    layers = {}
    for name, module in unet.named_modules():
        if not name or module_excluded(name, exclude):
            continue
        if isinstance(module, torch.nn.Conv2d):
            layers[name] = "conv"
        elif isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if level >= 3 or (level >= 2 and ".ff.net." in f".{name}.") or (level >= 2.5 and leaf in QKV):
                layers[name] = "linear"
    return layers


def attention_modules(unet: torch.nn.Module, exclude: Iterable[str]) -> list[str]:
    """diffusers `Attention` modules (level 4 quantizes their Q, K, V and softmax)."""
    from diffusers.models.attention_processor import Attention

    exclude = tuple(exclude)
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and not module_excluded(name, exclude)
    ]


def make_percentile_calibrator(percentile: float) -> tuple[type, tuple, dict]:
    """A modelopt calibrator constructor `(class, args, kwargs)` for `percentile` (e.g. 99.99).

    Range = the largest, over calibration batches, of the `percentile`-th percentile of |x| in the batch
    (from `topk` over the top (100 - percentile) % of |x|: exact, and cheap at the high percentiles
    calibration uses). The class subclasses modelopt's calibrator base, hence built on first use.
    """
    from modelopt.torch.quantization.calib.calibrator import _Calibrator

    class PercentileCalibrator(_Calibrator):
        def __init__(self, num_bits=8, axis=None, unsigned=False, percentile: float = 99.99):
            super().__init__(num_bits, axis, unsigned)
            self._percentile = percentile
            self._calib_amax = None

        def collect(self, x: torch.Tensor) -> None:
            values = x.detach().abs().flatten().float()
            k = max(1, math.ceil(values.numel() * (100.0 - self._percentile) / 100.0))
            amax = values.topk(min(k, values.numel())).values[-1]
            self._calib_amax = amax if self._calib_amax is None else torch.maximum(self._calib_amax, amax)

        def reset(self) -> None:
            self._calib_amax = None

        def compute_amax(self, *args, **kwargs):
            return self._calib_amax

    return PercentileCalibrator, (), {"percentile": percentile}


class QuantizerNames:
    """A quantizer filter matching exactly these quantizer module names.

    modelopt matches a filter against every quantizer: one set lookup per quantizer, where a glob pattern
    per layer (thousands on SDXL) made configuring quadratic (~25 s on the tiny SDXL U-Net).
    """

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)

    def __call__(self, name: str) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"QuantizerNames({len(self.names)} quantizers)"


def quant_config(
    unet: torch.nn.Module,
    precision: str,
    level: float,
    exclude: Iterable[str],
    *,
    smoothquant_alpha: float | None,
    calibration: str,
    percentile: float,
) -> dict[str, Any]:
    """What `quantize` applies: `groups` [(quantizer names, quantizer attributes)] and the calibration
    `algorithm` (modelopt's "max", or {"method": "smoothquant", "alpha": ...}); `layers`: `selected_layers`."""
    bits = 8 if precision == "int8" else (4, 3)
    weights = {"num_bits": bits, "axis": 0 if precision == "int8" else None}
    inputs = {"num_bits": bits, "axis": None}
    conv_inputs = dict(inputs)
    if calibration == "percentile":
        conv_inputs["calibrator"] = make_percentile_calibrator(percentile)
    layers = selected_layers(unet, level, exclude)
    groups = [
        (QuantizerNames(f"{n}.weight_quantizer" for n in layers), weights),
        (QuantizerNames(f"{n}.input_quantizer" for n, k in layers.items() if k == "linear"), inputs),
        (QuantizerNames(f"{n}.input_quantizer" for n, k in layers.items() if k == "conv"), conv_inputs),
    ]
    if level >= 4:
        parts = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
        groups.append((QuantizerNames(f"{n}.{p}" for n in attention_modules(unet, exclude) for p in parts), inputs))
    algorithm: Any = "max"
    if uses_smoothquant(precision, smoothquant_alpha):
        algorithm = {"method": "smoothquant", "alpha": smoothquant_alpha}
    return {"groups": groups, "algorithm": algorithm, "layers": layers}


def uses_smoothquant(precision: str, smoothquant_alpha: float | None) -> bool:
    """Whether calibration applies SmoothQuant (int8 only): per-channel input pre-scales on the linear layers."""
    return precision == "int8" and smoothquant_alpha is not None


def quantizers(unet: torch.nn.Module) -> dict[str, Any]:
    """Every enabled modelopt `TensorQuantizer` of `unet`, by module name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: m for name, m in unet.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def quantize(unet: torch.nn.Module, config: dict[str, Any], forward_loop: Callable[[torch.nn.Module], None]) -> None:
    """Quantize `unet` in place with modelopt (`quant_config`'s groups and algorithm), quietly."""
    import io

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # "Inserted N quantizers", ...
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")  # the float layers
        # insert every quantizer switched off, switch on and configure the chosen ones (modelopt's quant_cfg
        # takes only glob patterns, one per layer here), then calibrate
        mtq.quantize(unet, {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None})
        for names, attributes in config["groups"]:
            if names.names:
                mtq.set_quantizer_attributes_full(unet, names, QuantizerAttributeConfig(**attributes, enable=True))
        mtq.calibrate(unet, config["algorithm"], forward_loop)
    unet.cost_counting_context = quantizers_disabled  # see accounting.count_macs


def set_export_dtype(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every quantizer the dtype its Q/DQ scales export in: a strongly typed TensorRT network needs
    them in the graph's own float type (modelopt's `trt_high_precision_dtype`)."""
    name = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}[dtype]
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in unet.modules():
        if isinstance(module, TensorQuantizer):
            module.trt_high_precision_dtype = name


@contextlib.contextmanager
def quantizers_disabled(unet: torch.nn.Module):
    """The U-Net with its quantizers passed through: the MAC count's meta forward (quantization changes
    the kind of each multiply-accumulate, not their number; the quantizers cannot run on meta tensors)."""
    enabled = list(quantizers(unet).values())
    for quantizer in enabled:
        quantizer.disable()
    try:
        yield unet
    finally:
        for quantizer in enabled:
            quantizer.enable()
