"""The ptq pass's deployed form for the `torch` target: real INT8 / FP8 layers in place of modelopt's fake quantizers.

The modelopt backend (`ptq_modelopt`) calibrates a fake-quantized U-Net: each selected `nn.Linear` / `nn.Conv2d`
carries an input and a weight quantizer (amax, and for SmoothQuant'd linears a per-channel pre-scale). For the
torch target those layers become `LowpLinear` / `LowpConv2d`: the weight stored as int8 (per output channel) or
float8_e4m3fn (per tensor) codes, run through `kernels.lowp` (`torch._int_mm` / `torch._scaled_mm`, the Triton
implicit-GEMM conv on CUDA). Each holds three tensors besides its bias:

    qweight   the weight codes, int8 or float8_e4m3fn, the layer's own weight shape
    act_mult  fp32, 1 / activation step (linear layers: per input channel, SmoothQuant's pre-scale folded in)
    scale     fp32, activation step x weight step: per output channel (int8) or one value (fp8)

Every other modelopt module goes back to its plain torch class (`DynamicModule.export`), so the artifact's state
holds no quantizer. At load the pass's `rebuild` makes the same layers empty (`lowp_modules(..., empty=True)`)
and the stored state fills them; the layers keep their dtypes through `.to(dtype)` (only bias follows it).
"""

from __future__ import annotations

from typing import Any

import torch

from sdcompiler.kernels.lowp import FP8, INT8, QMAX, conv2d_lowp, conv_kernel, linear_lowp, multiplier, quantize
from sdcompiler.passes.errors import LoweringError

DTYPES = {"int8": INT8, "fp8": FP8}
_FIXED = ("qweight", "act_mult", "scale")  # tensors whose dtype `.to(dtype)` must not change


class _LowpLayer(torch.nn.Module):
    def _apply(self, fn, recurse=True):
        # `.to(float16)` would turn fp8 codes and fp32 scales into float16: move them, keep their dtypes
        kept = {name: (t, t.dtype) for name, t in self._buffers.items() if name in _FIXED and t is not None}
        super()._apply(fn, recurse)
        for name, (before, dtype) in kept.items():
            moved = self._buffers[name]
            if moved.dtype != dtype:
                self._buffers[name] = before.to(device=moved.device)
        return self

    def _init(self, qweight: torch.Tensor, act_mult: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self.register_buffer("qweight", qweight)
        self.register_buffer("act_mult", act_mult)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def precision(self) -> str:
        return "int8" if self.qweight.dtype == INT8 else "fp8"


class LowpLinear(_LowpLayer):
    """An `nn.Linear` that runs in INT8 / FP8 (`kernels.lowp.linear_lowp`)."""

    def __init__(self, qweight, act_mult, scale, bias):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self._init(qweight, act_mult, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_lowp(x, self.qweight, self.act_mult, self.scale, self.bias)

    def kernel(self, device: str) -> str:
        return "torch._int_mm" if self.precision == "int8" else "torch._scaled_mm"

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.precision}"


class LowpConv2d(_LowpLayer):
    """An `nn.Conv2d` (groups 1, zero padding) that runs in INT8 / FP8 (`kernels.lowp.conv2d_lowp`)."""

    def __init__(self, qweight, act_mult, scale, bias, stride, padding, dilation):
        super().__init__()
        self.in_channels, self.out_channels = qweight.shape[1], qweight.shape[0]
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._init(qweight, act_mult, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_lowp(
            x, self.qweight, self.act_mult, self.scale, self.bias, self.stride, self.padding, self.dilation
        )

    def kernel(self, device: str) -> str:
        return conv_kernel(device, "torch._int_mm" if self.precision == "int8" else "torch._scaled_mm")

    def extra_repr(self) -> str:
        k = tuple(self.qweight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, {self.precision}"


def _empty_like_layer(module: torch.nn.Module, precision: str, smoothed: bool) -> _LowpLayer:
    """A layer of `module`'s shape with uninitialized tensors on meta (the stored state is assigned at load)."""
    meta = torch.device("meta")
    dtype = DTYPES[precision]
    weight = module.weight
    bias = None if module.bias is None else torch.empty(weight.shape[0], device=meta)
    per_channel = weight.shape[0] if precision == "int8" else ()
    scale = torch.empty(per_channel, device=meta)
    qweight = torch.empty(weight.shape, dtype=dtype, device=meta)
    if isinstance(module, torch.nn.Linear):
        mult = torch.empty(weight.shape[1] if smoothed else (), device=meta)
        return LowpLinear(qweight, mult, scale, bias)
    return LowpConv2d(
        qweight, torch.empty((), device=meta), scale, bias, module.stride, module.padding, module.dilation
    )


def _from_quantized(module: torch.nn.Module, precision: str, smoothed: bool) -> _LowpLayer:
    """The deployed layer of a calibrated modelopt `QuantLinear` / `QuantConv2d` (same scales, same rounding)."""
    dtype = DTYPES[precision]
    qmax = QMAX[dtype]
    inq, wq = module.input_quantizer, module.weight_quantizer
    if getattr(inq, "narrow_range", False) or getattr(wq, "narrow_range", False):
        raise ValueError(f"narrow-range quantizers are not supported (layer {type(module).__name__})")
    weight = module.weight.detach().float()
    w_amax = wq.amax.detach().float().reshape(-1)  # (N,) per channel (int8) or (1,) per tensor (fp8)
    x_amax = inq.amax.detach().float().reshape(())
    codes = quantize(weight.reshape(weight.shape[0], -1), multiplier(w_amax, dtype).reshape(-1, 1), dtype)
    qweight = codes.reshape(weight.shape)
    scale = (x_amax / qmax) * (w_amax / qmax)  # activation step x weight step
    if precision == "fp8":
        scale = scale.reshape(())
    mult = multiplier(x_amax, dtype)
    bias = None if module.bias is None else module.bias.detach().float().clone()
    if isinstance(module, torch.nn.Linear):
        pre = inq.pre_quant_scale
        if smoothed:
            ones = torch.ones(weight.shape[1])
            mult = (ones if pre is None else pre.detach().float().reshape(-1)) * mult
        elif pre is not None:
            raise ValueError("a SmoothQuant pre-scale on a layer the recipe did not smooth")
        return LowpLinear(qweight, mult, scale, bias)
    if inq.pre_quant_scale is not None:
        raise ValueError("a SmoothQuant pre-scale on a convolution")
    return LowpConv2d(qweight, mult, scale, bias, module.stride, module.padding, module.dilation)


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def lowp_modules(
    unet: torch.nn.Module, layers: dict[str, str], precision: str, smoothed: bool, *, empty: bool = False
) -> dict[str, Any]:
    """Replace `layers` (name -> "conv" | "linear", `ptq_modelopt.selected_layers`) by their INT8 / FP8 form.

    From a calibrated modelopt U-Net (compile time: codes and scales from its quantizers, then every modelopt
    module back to its plain class), or `empty` (load time: shapes only, on meta). `smoothed`: linear layers
    carry a per-channel `act_mult` (SmoothQuant). Returns what was done: layer counts by kind.
    """
    counts: dict[str, int] = {}
    for name, kind in layers.items():
        module = unet.get_submodule(name)
        if kind == "conv" and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(f"{name}: only groups=1 convolutions with zero padding run in low precision")
        new = _empty_like_layer(module, precision, smoothed) if empty else _from_quantized(module, precision, smoothed)
        _set_module(unet, name, new)
        counts[kind] = counts.get(kind, 0) + 1
    if not empty:
        unquantize(unet)
    return counts


def unquantize(unet: torch.nn.Module) -> None:
    """Turn every remaining modelopt module back into its plain torch class, quantizers dropped, in place."""
    from modelopt.torch.opt.dynamic import DynamicModule

    for module in list(unet.modules()):
        if isinstance(module, DynamicModule):
            module.export()  # in place: the original class, its parameters kept
    for module in list(unet.modules()):  # quantizers that export leaves behind (attention's bmm quantizers)
        for child in [n for n, c in module.named_children() if type(c).__name__ == "TensorQuantizer"]:
            delattr(module, child)
    if hasattr(unet, "cost_counting_context"):
        del unet.cost_counting_context
    for name, module in unet.named_modules():
        if isinstance(module, DynamicModule) or type(module).__name__ == "TensorQuantizer":
            raise RuntimeError(f"{name}: modelopt module left after unquantize")


def layer_kernels(unet: torch.nn.Module, device: str) -> dict[str, int]:
    """How many low-precision layers run each kernel on `device`."""
    kernels: dict[str, int] = {}
    for module in unet.modules():
        if isinstance(module, _LowpLayer):
            kernel = module.kernel(device)
            kernels[kernel] = kernels.get(kernel, 0) + 1
    return kernels


def fixed_dtype_tensors(unet: torch.nn.Module) -> set[str]:
    """State names that keep their dtype when the artifact's precision is applied (codes and fp32 scales)."""
    return {f"{name}.{t}" for name, m in unet.named_modules() if isinstance(m, _LowpLayer) for t in _FIXED}


def layer_macs(unet: torch.nn.Module, layers: dict[str, str], count) -> tuple[int, int]:
    """(MACs of `layers`, MACs of the whole U-Net) of one forward: `count(unet)` runs the meta forward (e.g.
    `accounting.count_macs`) while hooks add up each layer's MACs from its output shape."""
    macs = [0]

    def hook(module, inputs, output):
        per_output = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.in_features
        macs[0] += output.numel() * per_output

    handles = [unet.get_submodule(name).register_forward_hook(hook) for name in layers]
    try:
        total = count(unet)
    finally:
        for handle in handles:
            handle.remove()
    return macs[0], total


def check_device(unet: torch.nn.Module, device: str) -> None:
    """Refuse, in one line, a CUDA device whose tensor cores lack FP8 when `unet` has FP8 layers (`_scaled_mm`
    needs compute capability 8.9: Ada, Hopper and later)."""
    if torch.device(device).type != "cuda" or not any(
        isinstance(m, _LowpLayer) and m.precision == "fp8" for m in unet.modules()
    ):
        return
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        raise LoweringError(
            f"this artifact's FP8 layers need a GPU of compute capability 8.9 or newer (this one: "
            f"{capability[0]}.{capability[1]}); run it on an Ada / Hopper GPU or on CPU, or compile with --recipe int8"
        )
