"""CondConv2d: the ME-CondConv module of A-SDM, a convolution whose kernel is mixed per sample from N experts.

CondConv (Yang et al. 2019) parameterises the kernel by the input. With
experts W_1..W_N of shape (C_out, C_in, kh, kw), biases b_1..b_N and a
routing head FC: C_in -> N (with bias), sample b of a batch gets

    a_b = sigmoid(FC(GAP(x_b)))            (GAP: mean over H and W; a_b in (0, 1)^N)
    W_b = sum_i a_{b,i} W_i,   c_b = sum_i a_{b,i} b_i
    y_b = conv(x_b, W_b) + c_b

Because convolution is linear in its kernel, this equals
sum_i a_{b,i} (conv(x_b, W_i) + b_i), the identity the export form uses.

Inheritance (A-SDM's ME-CondConv): `from_convs` fills the experts from the
kept convolution (expert 0) and the same-shaped convolutions of the pruned
blocks, and sets the routing head to FC weight 0, bias
(+g, -g, ..., -g) with g = `primary_gate` (10 by default). Every sample then
gets a = (sigmoid(g), sigmoid(-g), ...) = (0.99995, 4.5e-5, ...), so the
module starts out within about N sigmoid(-g) (relative; 1e-4 for a few
experts) of the kept conv, and training moves it away from there. The price: sigmoid'(10) = 4.5e-5 scales the gradient
reaching the routing head, so the gates move slowly at first; a smaller
`primary_gate` (3: a_0 = 0.95) trades initial exactness for faster routing.
For an exact reproduction set `fixed_routing` (or pass `routing_weights`) to
one-hot(0): 1 * W_0 + 0 * W_i is W_0 bit for bit.

Which routing weights apply, first match wins: the `routing_weights`
argument of `forward`, (B, N) or (N,); the `fixed_routing` buffer (N,); the
routing head. A vector (N,) applies to every sample.

Two forward forms, equal up to float summation order:

- eager (`grouped_conv`): one matmul builds the B per-sample kernels,
  a (B, N) @ W (N, C_out C_in kh kw), and ONE grouped convolution with
  groups = B runs them on the input viewed as (1, B C_in, H, W). The cost is
  B plain convolutions plus the tiny routing head; there is no Python loop
  over samples. `FlopCounterMode` counts it as exactly B plain convs.
- export (`stacked_conv`, used under `torch.onnx.export`, `torch.jit.trace`
  and `torch.export`): ONNX's Conv needs a static `group` attribute, so the
  grouped form would bake the traced batch size into the graph. Instead all
  experts are stacked on the output axis, one conv with N C_out output
  channels gives (B, N C_out, H', W'), and the routing-weighted sum over N
  follows. Every shape stays dynamic, but the conv costs N times the FLOPs
  (and N times the activation memory) of the eager form.

With one routing vector (N,) for all samples (`fixed_routing`) the kernel
is the same for every sample, so both forms collapse to one ordinary conv
with the mixed kernel sum_i a_i W_i: the cost of the original conv, in eager
mode and in exported graphs alike.

`fixed_routing` is a buffer registered as None, so it enters the
state_dict only once set. Loading follows the state_dict either way: a
state_dict holding `fixed_routing` sets the buffer (also on a module where
it was None, e.g. one rebuilt on meta), one holding the experts but not
`fixed_routing` clears it. So `load_state_dict(strict=True)` never fails on
it, and a module round-trips through its state_dict with its routing mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

_CONV_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def _exporting() -> bool:
    """Whether a graph is being captured whose Conv `group` must not depend on the batch size."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()


class CondConv2d(nn.Module):
    """A conditionally parameterised 2-D convolution (groups=1, zero padding) over `num_experts` kernels.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or (kh, kw).
        num_experts: N, the number of expert kernels.
        stride, padding, dilation: as `nn.Conv2d` (padding may also be "same" / "valid"), shared by all experts.
        bias: whether every expert has a bias (mixed like the kernels).
        device, dtype: of the parameters.

    Parameters: `weight` (N, C_out, C_in, kh, kw), `bias` (N, C_out) or None, `routing` = `nn.Linear(C_in, N)`.
    Buffer: `fixed_routing` (N,) or None; loading a state_dict sets or clears it (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        num_experts: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be at least 1")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.num_experts = num_experts
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.routing = nn.Linear(in_channels, num_experts, **factory)
        self.register_buffer("fixed_routing", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as `nn.Conv2d` initialises its kernel and bias."""
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[expert], a=5**0.5)
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / fan_in**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_convs(
        cls, convs: list[nn.Conv2d], num_experts: int | None = None, primary_gate: float = 10.0
    ) -> CondConv2d:
        """ME-CondConv inheritance: experts copied from `convs`, routing initialised to select `convs[0]`.

        Args:
            convs: `convs[0]` is the kept conv; the others are same-shaped convs of the pruned blocks.
            num_experts: defaults to `len(convs)`; fewer takes the first `num_experts` convs, more pads with
                copies of `convs[0]`.
            primary_gate: g in the routing bias (+g, -g, ..., -g); the initial output is within about
                `sigmoid(-g)` (relative) of `convs[0]`'s.

        Raises:
            ValueError: no convs, a non-`nn.Conv2d`, `groups != 1`, non-zero padding mode, or convs that differ
                in shape, hyper-parameters or bias presence.
        """
        if not convs:
            raise ValueError("from_convs needs at least one conv")
        for index, conv in enumerate(convs):
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"convs[{index}] is a {type(conv).__name__}, not an nn.Conv2d")
        kept = convs[0]
        for index, conv in enumerate(convs[1:], start=1):
            for attribute in _CONV_ATTRIBUTES:
                if getattr(conv, attribute) != getattr(kept, attribute):
                    raise ValueError(
                        f"convs[{index}].{attribute}={getattr(conv, attribute)!r} differs from "
                        f"convs[0].{attribute}={getattr(kept, attribute)!r}"
                    )
            if (conv.bias is None) != (kept.bias is None):
                raise ValueError(
                    f"convs[{index}] {'has no' if conv.bias is None else 'has a'} bias, convs[0] "
                    f"{'has no' if kept.bias is None else 'has a'} bias"
                )
        if kept.groups != 1:
            raise ValueError(f"CondConv2d supports groups=1 only; the convs have groups={kept.groups}")
        if kept.padding_mode != "zeros":
            raise ValueError(f"CondConv2d supports padding_mode='zeros' only; the convs have {kept.padding_mode!r}")
        num_experts = len(convs) if num_experts is None else num_experts
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be at least 1")
        sources = (list(convs) + [kept] * num_experts)[:num_experts]

        module = cls(
            kept.in_channels,
            kept.out_channels,
            kept.kernel_size,
            num_experts,
            stride=kept.stride,
            padding=kept.padding,
            dilation=kept.dilation,
            bias=kept.bias is not None,
            device=kept.weight.device,
            dtype=kept.weight.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(torch.stack([conv.weight.to(kept.weight) for conv in sources]))
            if module.bias is not None:
                module.bias.copy_(torch.stack([conv.bias.to(kept.bias) for conv in sources]))
            module.routing.weight.zero_()
            module.routing.bias.fill_(-primary_gate)
            module.routing.bias[0] = primary_gate
        return module

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Make the optional `fixed_routing` buffer follow the state_dict (set if present, None if absent)."""
        key = prefix + "fixed_routing"
        if key in state_dict:
            if self.fixed_routing is None:  # a placeholder the base class then assigns (assign=True) or copies into
                self.fixed_routing = torch.empty(
                    state_dict[key].shape, dtype=self.weight.dtype, device=self.weight.device
                )
        elif prefix + "weight" in state_dict:  # this module's full state, saved without fixed routing
            self.fixed_routing = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The routing head: a = sigmoid(FC(GAP(x))), shape (B, N)."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """y = conv(x, sum_i a_i W_i) + sum_i a_i b_i per sample.

        Args:
            x: (B, C_in, H, W).
            routing_weights: (B, N), or (N,) for all samples; overrides `fixed_routing` and the routing head.
        """
        if routing_weights is None:
            routing_weights = self.fixed_routing if self.fixed_routing is not None else self.route(x)
        exporting = _exporting()
        if not exporting:  # under tracing the shapes are traced values; a Python check would warn and bake them in
            shape = tuple(routing_weights.shape)
            if shape not in ((self.num_experts,), (x.shape[0], self.num_experts)):
                raise ValueError(
                    f"routing weights have shape {shape}, expected "
                    f"({x.shape[0]}, {self.num_experts}) or ({self.num_experts},)"
                )
        routing_weights = routing_weights.to(self.weight.dtype)
        if routing_weights.dim() == 1:
            return self.fixed_conv(x, routing_weights)
        if exporting:
            return self.stacked_conv(x, routing_weights)
        return self.grouped_conv(x, routing_weights)

    def fixed_conv(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """One routing vector (N,) for every sample: one ordinary conv with the mixed kernel."""
        weight = (routing_weights @ self.weight.flatten(1)).view(self.weight.shape[1:])
        bias = routing_weights @ self.bias if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def grouped_conv(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """Eager form: the B per-sample kernels as one grouped conv (groups=B). `routing_weights`: (B, N)."""
        batch, _, height, width = x.shape
        weight = (routing_weights @ self.weight.flatten(1)).view(
            batch * self.out_channels, self.in_channels, *self.kernel_size
        )
        bias = (routing_weights @ self.bias).flatten() if self.bias is not None else None
        y = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            groups=batch,
        )
        return y.view(batch, self.out_channels, *y.shape[2:])

    def stacked_conv(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """Export form: every expert on every sample (one conv, N C_out channels), then the weighted sum over N.

        Dynamic in batch and spatial size, at N times the conv FLOPs of `grouped_conv`.
        """
        bias = self.bias.flatten() if self.bias is not None else None
        y = F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation)
        y = y.unflatten(1, (self.num_experts, self.out_channels))
        return (y * routing_weights[:, :, None, None, None]).sum(dim=1)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"num_experts={self.num_experts}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.fixed_routing is not None:
            text += ", fixed_routing=True"
        return text
