"""CUDA-graph capture for static-shape calls (the `torch` target's `cuda_graphs` option), and the
`torch.compile` wrapper of its `compile` option: the torch target's runtime accelerators.

A denoising loop calls the U-Net tens of times with the same shapes; on a
GPU each call launches hundreds of small kernels, and at small batch the
launch overhead is a large share of the step. `GraphedCallable` captures
the call once per input signature (shapes, dtypes, which optional inputs
are None) into a `torch.cuda.CUDAGraph` with static input buffers, then
replays it: inputs are copied into the buffers, the graph replays, and a
copy of the static output is returned (the next replay overwrites it).

Constraints, as for any CUDA graph: the callable must be free of host
synchronisation and data-dependent control flow, and must take every
varying value as a tensor argument (pass the timestep as a tensor; a
Python number would be baked into the graph). Depends on torch only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


def _signature(args: tuple) -> tuple:
    return tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)


class GraphedCallable:
    """`fn(*tensors)` replayed from CUDA graphs, one per input signature (at most `max_graphs`, LRU)."""

    def __init__(self, fn: Callable, max_graphs: int = 4, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; load the artifact with device='cuda'")
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self._graphs: OrderedDict = OrderedDict()
        self.captures = 0  # how many graphs were captured (for tests and logs)

    def __call__(self, *args):
        key = _signature(args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(args)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for buffer, value in zip(static_in, args):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, args: tuple):
        static_in = tuple(None if a is None else a.detach().clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):  # lazy init (cuBLAS handles, Triton compiles) happens outside capture
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.fn(*static_in)
        self.captures += 1
        return graph, static_in, static_out


def compiled(fn: Callable, mode: str = "default") -> Callable:
    """`torch.compile(fn)` with `mode` ("default" is torch's own default): the first call per input shape
    compiles, later calls run the compiled code."""
    return torch.compile(fn, mode=None if mode == "default" else mode)
