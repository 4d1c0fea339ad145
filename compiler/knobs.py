"""Environment knobs, all in one place.

| variable                | default                  | meaning                                   |
|-------------------------|--------------------------|-------------------------------------------|
| SDCOMPILER_CACHE_DIR    | ~/.cache/sdcompiler      | configs, calibration data, build caches   |
| SDCOMPILER_NUM_THREADS  | unset (torch's default)  | intra-op threads for torch and ORT alike  |
| SDCOMPILER_DEBUG        | 0                        | CLI prints tracebacks (same as --debug)   |
| SDCOMPILER_QUIET        | 0                        | no progress bars (same as --quiet)        |
| SDCOMPILER_MAX_STEPS    | 1000                     | most denoising steps one call may ask for |
| SDCOMPILER_MAX_IMAGE_SIZE | 4096                   | most pixels per image side in one call    |
| SDCOMPILER_MAX_BATCH    | 64                       | most images (prompts x per prompt) a call |
| SDCOMPILER_MEMORY_LIMIT | unset (free memory)      | bytes preflight checks may plan for (4G)  |
| SDCOMPILER_TRITON_STUB_SITE | <prefix>/share/sdcompiler/triton-stub-site | numpy<2 for the Triton stub |

SDCOMPILER_NUM_THREADS is applied with `torch.set_num_threads` by `compile_pipeline`, `load_compiled` and
`benchmark`, and ONNX Runtime sessions get the count torch then uses, set or not: one setting for both, so a
bench of an ONNX artifact against an eager checkpoint compares like with like (torch's default is the
physical core count, or OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("SDCOMPILER_CACHE_DIR", Path.home() / ".cache" / "sdcompiler")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def num_threads() -> int | None:
    """SDCOMPILER_NUM_THREADS, or None when unset."""
    if not os.environ.get("SDCOMPILER_NUM_THREADS"):
        return None
    return _positive_int("SDCOMPILER_NUM_THREADS", 0)


def apply_num_threads() -> int:
    """Set torch's intra-op threads to SDCOMPILER_NUM_THREADS where it is set; the count torch uses now,
    which ONNX Runtime sessions are given too."""
    import torch

    threads = num_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def debug() -> bool:
    return os.environ.get("SDCOMPILER_DEBUG", "0") not in ("", "0", "false")


def quiet() -> bool:
    return os.environ.get("SDCOMPILER_QUIET", "0") not in ("", "0", "false")


def set_quiet(value: bool) -> None:
    os.environ["SDCOMPILER_QUIET"] = "1" if value else "0"


def _positive_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        from sdcompiler.errors import ConfigError

        raise ConfigError(f"{name}={value!r} must be a positive integer; unset it for the default {default}")
    return number


def max_steps() -> int:
    return _positive_int("SDCOMPILER_MAX_STEPS", 1000)


def max_image_size() -> int:
    return _positive_int("SDCOMPILER_MAX_IMAGE_SIZE", 4096)


def max_batch() -> int:
    return _positive_int("SDCOMPILER_MAX_BATCH", 64)


def memory_limit() -> int | None:
    """SDCOMPILER_MEMORY_LIMIT in bytes (suffixes K, M, G, T accepted), or None when unset."""
    value = os.environ.get("SDCOMPILER_MEMORY_LIMIT", "").strip()
    if not value:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1].upper(), 1)
    try:
        number = float(value[:-1] if scale > 1 else value) * scale
    except ValueError:
        number = 0
    if not number >= 1 or number == float("inf"):
        from sdcompiler.errors import ConfigError

        raise ConfigError(f"SDCOMPILER_MEMORY_LIMIT={value!r} must be a size such as 8G or 500M")
    return int(number)


def triton_stub_site() -> Path:
    """SDCOMPILER_TRITON_STUB_SITE: a folder holding numpy 1.26 alone, put first on the Triton Python backend
    stub's path (the stub in nvidia-pytriton 0.7.0 reads numpy arrays through a numpy-1 struct layout and
    corrupts them under numpy 2). Default: <sys.prefix>/share/sdcompiler/triton-stub-site, where
    `make install` puts it."""
    import sys

    default = Path(sys.prefix) / "share" / "sdcompiler" / "triton-stub-site"
    return Path(os.environ.get("SDCOMPILER_TRITON_STUB_SITE", default)).expanduser()
