"""Plumbing shared by every sd-compiler kernel.

Each kernel module in this package has the same four parts:

1. `*_reference(...)`: the pure-torch definition (the spec; runs anywhere,
   exports to ONNX as standard ops);
2. `*_triton(...)`: the Triton launcher; on CPU tensors it runs only under
   `TRITON_INTERPRET=1` (how the tests check it against the reference);
3. a `torch.library.custom_op` named `sdcompiler::<name>` that runs the
   Triton kernel on CUDA when Triton imports, and the reference elsewhere,
   with a fake (meta) implementation so shape propagation and meta-device
   MAC counting work;
4. a FLOP formula registered with `torch.utils.flop_counter`, so
   `FlopCounterMode` (and `sdcompiler.passes.accounting.count_macs`) counts
   the op honestly.

Nothing here imports Triton at module import: `triton_available()` does it
on first use. The environment variable `SDCOMPILER_DISABLE_TRITON=1` forces
the reference on CUDA too (for A/B checks and for bisecting a kernel bug).
"""

from __future__ import annotations

import functools
import os

import torch

LIBRARY = "sdcompiler"


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (it is the `[triton]` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (Triton kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op should launch its Triton kernel for these tensors.

    Yes when Triton imports, the user has not disabled it, and every tensor
    is on CUDA (or, under the interpreter, on CPU).
    """
    if os.environ.get("SDCOMPILER_DISABLE_TRITON", "0") == "1" or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def require_triton() -> None:
    """Raise a one-line error naming the extra when Triton is missing."""
    if not triton_available():
        raise RuntimeError("this kernel needs Triton, which is not installed: pip install 'sd-compiler[triton]'")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (`tl.arange` needs power-of-two lengths)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
