"""GRI attention in tests of the `swap_attention` pass: which modules the pass swapped, and the op's pure-torch
reference instead of the Triton kernel (shared by the unit and integration tests of preset `gri`)."""

from __future__ import annotations

import pytest

from sdcompiler.passes.swap_attention import GRIAttnProcessor


def gri_modules(unet) -> list:
    """The attention modules whose processor is GRI's."""
    return [m for m in unet.modules() if hasattr(m, "processor") and isinstance(m.processor, GRIAttnProcessor)]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Autouse where imported. Under TRITON_INTERPRET=1 the op would run the Triton kernel on CPU (slow, tested in
    test_kernels_gri); these tests are about the pass, so the op dispatches to its reference."""
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
