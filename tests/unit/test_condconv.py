"""CondConv2d (ME-CondConv): inheritance exactness, the batched forms against a per-sample loop, gradients, ONNX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdcompiler.passes.condconv import CondConv2d

# (kernel_size, padding, stride): 3x3 same-size, 1x1, and 3x3 stride 2.
CONV_SHAPES = [(3, 1, 1), (1, 0, 1), (3, 1, 2)]


def _convs(
    count: int,
    kernel_size: int = 3,
    padding: int = 1,
    stride: int = 1,
    bias: bool = True,
    in_channels: int = 4,
    out_channels: int = 6,
    seed: int = 0,
) -> list[nn.Conv2d]:
    torch.manual_seed(seed)
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        for _ in range(count)
    ]


def _random_condconv(num_experts: int = 3, bias: bool = True, stride: int = 1, seed: int = 0) -> CondConv2d:
    torch.manual_seed(seed)
    module = CondConv2d(4, 6, 3, num_experts, stride=stride, padding=1, bias=bias)
    with torch.no_grad():  # a routing head whose gates differ clearly between samples
        module.routing.weight.normal_(0, 2)
        module.routing.bias.normal_(0, 1)
    return module


def _x(batch: int = 3, height: int = 9, width: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size,padding,stride", CONV_SHAPES)
def test_one_hot_routing_reproduces_the_kept_conv(kernel_size, padding, stride, bias):
    kept, other = _convs(2, kernel_size, padding, stride, bias)
    module = CondConv2d.from_convs([kept, other])
    x = _x()
    with torch.no_grad():
        expected = kept(x)
        one_hot = F.one_hot(torch.zeros(3, dtype=torch.long), 2).float()
        per_sample = module(x, routing_weights=one_hot)  # grouped conv, groups=B
        module.fixed_routing = torch.tensor([1.0, 0.0])
        fixed = module(x)  # one plain conv with 1 * W_0 + 0 * W_1 = W_0
    torch.testing.assert_close(per_sample, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed, expected, atol=1e-6, rtol=0)


def test_default_inheritance_is_close_to_the_kept_conv():
    kept, *others = _convs(3)
    module = CondConv2d.from_convs([kept, *others])
    x = _x()
    with torch.no_grad():
        gates = module.route(x)
        expected, actual = kept(x), module(x)
    assert torch.allclose(gates[:, 0], torch.tensor(torch.sigmoid(torch.tensor(10.0)).item()))
    assert gates[:, 1:].max() < 1e-4
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_form_matches_a_per_sample_loop(bias, stride):
    module = _random_condconv(bias=bias, stride=stride)
    x = _x(batch=4)
    with torch.no_grad():
        gates = module.route(x)
        assert (gates.max(0).values - gates.min(0).values).min() > 0.05  # the samples really route differently
        reference = []
        for b in range(x.shape[0]):
            kernel = torch.einsum("n,noikl->oikl", gates[b], module.weight)
            bias_b = gates[b] @ module.bias if bias else None
            reference.append(F.conv2d(x[b : b + 1], kernel, bias_b, module.stride, module.padding))
        torch.testing.assert_close(module(x), torch.cat(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_stacked_export_form_matches_the_grouped_form(bias):
    module = _random_condconv(bias=bias, stride=2)
    x = _x(batch=3)
    with torch.no_grad():
        gates = module.route(x)
        torch.testing.assert_close(module.stacked_conv(x, gates), module.grouped_conv(x, gates), atol=1e-5, rtol=0)


def test_gradients_reach_experts_biases_and_routing_head():
    module = _random_condconv()
    module(_x()).square().mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().min() > 0, name


def test_from_convs_pads_with_copies_of_the_kept_conv_and_truncates():
    convs = _convs(2)
    padded = CondConv2d.from_convs(convs, num_experts=4)
    for expert, source in enumerate([0, 1, 0, 0]):
        assert torch.equal(padded.weight[expert], convs[source].weight)
        assert torch.equal(padded.bias[expert], convs[source].bias)
    assert padded.routing.bias.tolist() == [10.0, -10.0, -10.0, -10.0]
    assert not padded.routing.weight.any()
    truncated = CondConv2d.from_convs(convs, num_experts=1)
    assert truncated.weight.shape == (1, 6, 4, 3, 3) and torch.equal(truncated.weight[0], convs[0].weight)


@pytest.mark.parametrize(
    "other,named",
    [
        (nn.Conv2d(4, 8, 3, padding=1), "out_channels"),
        (nn.Conv2d(4, 6, 1), "kernel_size"),
        (nn.Conv2d(4, 6, 3, padding=1, stride=2), "stride"),
        (nn.Conv2d(4, 6, 3, padding=1, bias=False), "bias"),
        (nn.Linear(4, 6), "Linear"),
    ],
)
def test_from_convs_rejects_mismatched_convs(other, named):
    with pytest.raises(ValueError, match=named):
        CondConv2d.from_convs([nn.Conv2d(4, 6, 3, padding=1), other])


def test_routing_weights_of_the_wrong_shape_are_rejected():
    module = _random_condconv(num_experts=3)
    with pytest.raises(ValueError, match="routing weights have shape"):
        module(_x(batch=2), routing_weights=torch.ones(2, 2))


def test_flop_counter_counts_the_grouped_conv_as_batch_plain_convs():
    module = _random_condconv(num_experts=3)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    x = _x(batch=3)
    with FlopCounterMode(display=False) as cond_counter, torch.no_grad():
        module(x)
    with FlopCounterMode(display=False) as plain_counter, torch.no_grad():
        plain(x)
    convolution = torch.ops.aten.convolution
    cond, reference = cond_counter.get_flop_counts()["Global"], plain_counter.get_flop_counts()["Global"]
    # The grouped conv (input (1, B C_in, H, W), kernel (B C_out, C_in, k, k)) counts exactly as the plain conv on
    # the batch: 2 * 3 * 6 * 4 * 9 * 9 * 7 = 27216 FLOPs here. The rest: the kernel and bias mixing a @ W, a @ b
    # (mms, 2 B N C_out (C_in k^2 + 1) = 3888 + 108) and the routing head (its addmm, 2 B C_in N = 72).
    assert cond[convolution] == reference[convolution] == 2 * 3 * 6 * 4 * 9 * 9 * 7
    assert cond[torch.ops.aten.mm] == 2 * 3 * 3 * 6 * (4 * 9 + 1)
    assert cond[torch.ops.aten.addmm] == 2 * 3 * 4 * 3


def test_extra_repr_names_the_hyper_parameters():
    module = CondConv2d(4, 6, 3, 2, stride=2, padding=1, bias=False)
    assert module.extra_repr() == "4, 6, kernel_size=(3, 3), num_experts=2, stride=(2, 2), padding=(1, 1), bias=False"
    module.fixed_routing = torch.tensor([1.0, 0.0])
    assert module.extra_repr().endswith("bias=False, fixed_routing=True")


def test_onnx_export_keeps_batch_and_spatial_size_dynamic(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU(), _random_condconv(stride=2)).eval()
    path = tmp_path / "condconv.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (_x(batch=2, height=8, width=8),),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}},
        )
    graph = onnx.load(str(path)).graph
    groups = [
        attribute.i
        for node in graph.node
        if node.op_type == "Conv"
        for attribute in node.attribute
        if attribute.name == "group"
    ]
    assert set(groups) <= {1}  # the expert-stacked form: no batch size baked into a grouped conv
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 8, 8), (3, 11, 6)]:
        x = _x(batch=batch, height=height, width=width, seed=batch)
        with torch.no_grad():
            expected = model(x)
        (actual,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-4, rtol=0)
