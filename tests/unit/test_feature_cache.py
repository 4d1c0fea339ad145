"""Feature inheritance across timesteps (`feature_cache`, preset `deepcache`): plans, split forward, both targets.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_feature_cache_compile.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdcompiler.passes import unet_example_inputs
from sdcompiler.passes.feature_cache import CacheSettings, SplitUNet, full_steps


def _unet(tiny_checkpoint, arch):
    import diffusers

    return diffusers.UNet2DConditionModel.from_pretrained(tiny_checkpoint(arch) / "unet").eval()


@pytest.mark.parametrize("steps", [1, 4, 10, 50])
@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_uniform_plan(steps, interval):
    plan = full_steps(steps, CacheSettings(interval=interval))
    assert len(plan) == steps and plan[0]
    assert [i for i, full in enumerate(plan) if full] == list(range(0, steps, interval))


@pytest.mark.parametrize("steps", [4, 10, 25, 50])
def test_nonuniform_plan_has_as_many_full_steps_clustered_at_the_center(steps):
    settings = CacheSettings(interval=3, schedule="nonuniform", center=0.3, power=1.4)
    plan = full_steps(steps, settings)
    full = [i for i, f in enumerate(plan) if f]
    assert plan[0] and len(full) == math.ceil(steps / 3)
    if steps >= 25:  # denser around 30 % of the trajectory than the uniform plan
        near = lambda idx: sum(abs(i - 0.3 * (steps - 1)) <= steps / 6 for i in idx)  # noqa: E731
        assert near(full) > near(range(0, steps, 3))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("latent", [16, 10])
def test_split_unet_full_and_shallow_equal_the_unet(tiny_checkpoint, arch, latent):
    unet = _unet(tiny_checkpoint, arch)
    inputs = unet_example_inputs(unet, 2, (latent, latent), generator=torch.Generator().manual_seed(1))
    added = inputs.get("added_cond_kwargs") or {}
    args = (
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        added.get("text_embeds"),
        added.get("time_ids"),
    )
    with torch.no_grad():
        expected = unet(**inputs, return_dict=False)[0]
        for branch in range(len(unet.down_blocks) - 1):
            split = SplitUNet(unet, branch)
            eps, deep = split.full(*args)
            torch.testing.assert_close(eps, expected, rtol=0, atol=0)
            # the shallow branch from the same step's deep features is the whole U-Net again
            torch.testing.assert_close(split.shallow(*args, deep=deep), expected, rtol=0, atol=0)
            # deep features: the input of up block n-1-branch, at the resolution of down block `branch`
            assert deep.shape[-2:] == (math.ceil(latent / 2**branch),) * 2


class _TwoOutputs(torch.nn.Module):
    """A stand-in for the refresh graph: `y` (what the plain graph keeps) and `z`, which only `head` computes."""

    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        y = self.body(x)
        return y, self.head(y).relu()


def test_a_graph_view_keeps_what_its_outputs_need_and_reads_the_same_weights_file(tmp_path):
    """`write_graph_view` (how a deepcache artifact's plain `unet/model.onnx` comes from `unet/refresh.onnx`): the
    view drops the nodes and weights only the other outputs need, reads the one weights file at the same offsets,
    and ONNX Runtime runs both graphs; the weights file is as readable as the graphs (onnx writes it 0600)."""
    import onnx
    import onnxruntime as ort

    from sdcompiler.errors import LoweringError
    from sdcompiler.passes.onnx_export import UNET_REFRESH, OnnxExport, export_model, write_graph_view

    module, x = _TwoOutputs().eval(), torch.randn(2, 64)
    export = OnnxExport(UNET_REFRESH, module, (x,), ["x"], ["y", "z"], {}, torch.float32, external_weights=True)
    folder = tmp_path / "unet"
    source = export_model(export, folder, 18)
    assert source == folder / "refresh.onnx"
    view = write_graph_view(source, folder / "model.onnx", ["y"])
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data", "refresh.onnx"]
    assert (folder / "model.onnx.data").stat().st_mode == source.stat().st_mode

    def weights(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return len(graph.node), {t.name: [(e.key, e.value) for e in t.external_data] for t in graph.initializer}

    (source_nodes, source_weights), (view_nodes, view_weights) = weights(source), weights(view)
    assert view_nodes < source_nodes and view_weights.items() < source_weights.items()  # head's weights dropped
    external = [entries for entries in view_weights.values() if entries]  # (tensors under 1 KB stay inline)
    assert external and all(("location", "model.onnx.data") in entries for entries in external)
    with torch.no_grad():
        y, z = module(x)
    full = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(str(view), providers=["CPUExecutionProvider"])
    assert [o.name for o in cut.get_outputs()] == ["y"]
    np.testing.assert_allclose(cut.run(None, {"x": x.numpy()})[0], y.numpy(), atol=1e-6)
    np.testing.assert_allclose(full.run(None, {"x": x.numpy()})[1], z.numpy(), atol=1e-6)
    with pytest.raises(LoweringError, match="no output"):
        write_graph_view(source, folder / "other.onnx", ["w"])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("branch", [0, 1])
def test_split_unet_takes_controlnet_residuals_as_the_unet_does(tiny_checkpoint, arch, branch):
    """Full path with every residual == `unet(..., down_block_additional_residuals=, mid_...=)`; the shallow path
    from that step's deep features takes the first `shallow_skips()` down residuals (more are ignored) and equals
    it again; a change to a shallow skip's residual moves the shallow output."""
    unet = _unet(tiny_checkpoint, arch)
    inputs = unet_example_inputs(unet, 2, (10, 10), generator=torch.Generator().manual_seed(1))
    added = inputs.get("added_cond_kwargs") or {}
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    args += (added.get("text_embeds"), added.get("time_ids"))
    shapes = []  # a ControlNet's residuals have the shapes of the skips and of the mid block's output
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape))]
    hooks += [
        b.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1])) for b in unet.down_blocks
    ]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, out: shapes.append(out.shape)))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        unet(**inputs)
        for hook in hooks:
            hook.remove()
        *down, mid = [torch.randn(shape, generator=generator) for shape in shapes]
        expected = unet(
            **inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False
        )[0]
        split = SplitUNet(unet, branch)
        eps, deep = split.full(*args, down_residuals=down, mid_residual=mid)
        torch.testing.assert_close(eps, expected, rtol=0, atol=0)
        shallow = split.shallow(*args, deep=deep, down_residuals=down)
        torch.testing.assert_close(shallow, expected, rtol=0, atol=0)
        assert split.shallow_skips() == (3 if branch == 0 else 6)  # conv_in + 2 resnets (+ downsampler + 2)
        moved = list(down)
        moved[split.shallow_skips() - 1] = moved[split.shallow_skips() - 1] + 1.0
        changed = split.shallow(*args, deep=deep, down_residuals=moved)
        assert (changed - expected).abs().max() > 1e-3
        assert torch.equal(split.shallow(*args, deep=deep, down_residuals=moved[: split.shallow_skips()]), changed)
        # the onnx target's refresh and shallow graphs take them positionally after the arch's added inputs
        from sdcompiler.passes.onnx_export import CachedUNetForExport

        extra = ["text_embeds", "time_ids"] if arch == "sdxl" else []
        base, skips = args[: 3 + len(extra)], split.shallow_skips()
        refresh = CachedUNetForExport(unet, branch, False, extra, len(down))(*base, *down, mid)
        torch.testing.assert_close(refresh[0], expected, rtol=0, atol=0)
        cached = CachedUNetForExport(unet, branch, True, extra, skips)(*base, *down[:skips], refresh[1])
        torch.testing.assert_close(cached, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("guess_mode", "pooled"), [(False, False), (True, False), (True, True)])
def test_shallow_controlnet_residuals_equal_the_nets_first_ones(tiny_checkpoint, tmp_path, guess_mode, pooled):
    """The ControlNet stopped after the down block that makes a shallow step's skips: its residuals equal the
    first ones of the whole net's (scale, guess mode's per-block scales, global pooling), and its mid block
    never runs."""
    import diffusers

    from sdcompiler.passes.feature_cache import shallow_controlnet_residuals
    from sdcompiler.testing import make_controlnet

    net = diffusers.ControlNetModel.from_pretrained(make_controlnet(tmp_path / "cn", tiny_checkpoint("sd15"))).eval()
    net.register_to_config(global_pool_conditions=pooled)
    unet = _unet(tiny_checkpoint, "sd15")
    inputs = unet_example_inputs(unet, 2, (8, 8), generator=torch.Generator().manual_seed(1))
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mid_calls = []
    net.mid_block.register_forward_hook(lambda *a: mid_calls.append(1))
    with torch.no_grad():
        down, _ = net(*args, controlnet_cond=image, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
        mid_calls.clear()
        for branch in (0, 1):
            skips = SplitUNet(unet, branch).shallow_skips()
            got = shallow_controlnet_residuals(net, skips, *args, image, 0.7, guess_mode)
            assert len(got) == skips and not mid_calls
            for residual, expected in zip(got, down):
                torch.testing.assert_close(residual, expected, rtol=0, atol=0)
            assert float(got[-1].abs().max()) > 1e-4
