"""CUDA-graph replay (`sdcompiler.cuda_graphs`) and the lowered U-Net on a real GPU (torch + Triton only;
the diffusers part runs when diffusers imports)."""

from __future__ import annotations

import pytest
import torch

from sdcompiler.cuda_graphs import GraphedCallable


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.time = torch.nn.Linear(1, 8)

    def forward(self, x, t, extra=None):
        h = torch.nn.functional.silu(self.conv(x)) + self.time(t.reshape(1, 1).float())[..., None, None]
        return h if extra is None else h + extra


def test_replay_equals_eager_and_recaptures_per_signature():
    model = _Toy().cuda().eval()
    graphed = GraphedCallable(model, max_graphs=2)
    for step, size in enumerate([16, 16, 16, 24, 16]):
        x = torch.randn(2, 4, size, size, device="cuda")
        t = torch.tensor(float(999 - 50 * step), device="cuda")
        with torch.inference_mode():
            expected = model(x, t)
        torch.testing.assert_close(graphed(x, t), expected, rtol=1e-5, atol=1e-5)
    assert graphed.captures == 2  # 16x16 once, 24x24 once; the last 16x16 replays
    extra = torch.randn(2, 8, 16, 16, device="cuda")
    x, t = torch.randn(2, 4, 16, 16, device="cuda"), torch.tensor(3.0, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(graphed(x, t, extra), model(x, t, extra), rtol=1e-5, atol=1e-5)
    assert graphed.captures == 3


def _small_unet(diffusers):
    """A two-stage fp16 U-Net on the GPU (seed 0): every block kind the lowering and compiling touch."""
    torch.manual_seed(0)
    return (
        diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=32,
            sample_size=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        .cuda()
        .half()
        .eval()
    )


def test_lowered_and_graphed_unet_matches_eager():
    diffusers = pytest.importorskip("diffusers")
    from sdcompiler.kernels.lowering import lower_unet

    unet = _small_unet(diffusers)
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.half)
    context = torch.randn(2, 77, 64, device="cuda", dtype=torch.half)
    t = torch.tensor(500.0, device="cuda")
    with torch.inference_mode():
        expected = unet(x, t, context, return_dict=False)[0].float()
    counts = lower_unet(unet)
    assert sum(counts.values()) > 0
    graphed = GraphedCallable(lambda s, tt, c: unet(s, tt, c, return_dict=False)[0])
    got = graphed(x, t, context).float()
    assert (got - expected).abs().max().item() < 2e-2 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_unet_matches_eager(mode):
    """The torch target's `compile: true` (`cuda_graphs.compiled`) on CUDA, both modes."""
    diffusers = pytest.importorskip("diffusers")
    from sdcompiler.cuda_graphs import compiled

    unet = _small_unet(diffusers)
    forward = compiled(lambda s, tt, c: unet(s, tt, c, return_dict=False)[0], mode)
    context = torch.randn(2, 77, 64, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        for step in range(3):  # reduce-overhead records its CUDA graph after warm-up calls
            x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.half)
            t = torch.tensor(900.0 - 100 * step, device="cuda")
            expected = unet(x, t, context, return_dict=False)[0].float()
            got = forward(x, t, context).float().clone()
            assert (got - expected).abs().max().item() < 2e-2 * max(1.0, expected.abs().max().item())


def test_graphed_unet_call_takes_controlnet_residuals():
    """The torch target's U-Net callable (`torch_unet`, cuda_graphs) with ControlNet residuals: one graph per
    signature with a static buffer per residual; replays equal eager calls for new residual values each step."""
    diffusers = pytest.importorskip("diffusers")
    from sdcompiler.targets.components import torch_unet

    unet = _small_unet(diffusers)
    graphed = torch_unet(unet, "cuda", cuda_graphs=True)
    eager = torch_unet(unet, "cuda")
    context = torch.randn(2, 77, 64)
    # the down residuals have the skips' shapes: conv_in's and each down block's outputs
    down_shapes = [(2, 64, 32, 32), (2, 64, 32, 32), (2, 64, 16, 16), (2, 128, 16, 16)]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        sample = torch.randn(2, 4, 32, 32, generator=g)
        down = [torch.randn(s, generator=g) for s in down_shapes]
        mid = torch.randn(2, 128, 16, 16, generator=g)
        t = 900 - 100 * step
        expected = eager(sample, t, context, down_residuals=down, mid_residual=mid)
        got = graphed(sample, t, context, down_residuals=down, mid_residual=mid)
        plain = graphed(sample, t, context)
        assert (got - expected).abs().max().item() < 2e-2 * max(1.0, expected.abs().max().item())
        assert (got - plain).abs().max().item() > 1e-3  # the residuals reached the graph
