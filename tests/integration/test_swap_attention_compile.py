"""GRI attention swap (`swap_attention`, preset `gri`): equivalence, honest MACs, errors, both targets.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_swap_attention.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gri_processors import gri_modules, reference_kernels  # noqa: F401  (reference_kernels: autouse fixture)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_gri_compiles_to_torch_and_onnx_and_generates_alike(compiled, arch):
    torch_pipe = compiled(arch, "torch", "gri")
    onnx_pipe = compiled(arch, "onnx", "gri")  # traced at latent 10: ragged tiles; runs at 16 below
    record = torch_pipe.manifest["passes"][0]
    assert record["name"] == "swap_attention" and record["metrics"]["swapped_attentions"] > 0
    assert record["macs_after"] < record["macs_before"]
    assert len(gri_modules(torch_pipe.unet)) == record["metrics"]["swapped_attentions"]  # rebuilt on load
    lowered = {s["name"]: s for s in torch_pipe.manifest["lowering"]["stages"]}["lower_kernels"]["results"]
    assert lowered["unet"]["group_norm_silu"] > 0 and lowered["vae"]["group_norm_silu"] > 0
    run = lambda pipe: (
        pipe(
            "a red cube",
            num_inference_steps=3,
            output_type="np",  # noqa: E731
            generator=torch.Generator().manual_seed(0),
        ).images
    )
    a, b = run(torch_pipe), run(onnx_pipe)
    assert a.shape == b.shape and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=2e-3)
