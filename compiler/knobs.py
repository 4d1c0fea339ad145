"""Environment knobs, all in one place.

| variable                | default                  | meaning                                   |
|-------------------------|--------------------------|-------------------------------------------|
| SDCOMPILER_CACHE_DIR    | ~/.cache/sdcompiler      | configs, calibration data, build caches   |
| SDCOMPILER_NUM_THREADS  | unset (torch/ORT default)| intra-op threads for torch and ORT        |
| SDCOMPILER_DEBUG        | 0                        | CLI prints tracebacks (same as --debug)   |
| SDCOMPILER_QUIET        | 0                        | no progress bars (same as --quiet)        |
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("SDCOMPILER_CACHE_DIR", Path.home() / ".cache" / "sdcompiler")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def num_threads() -> int | None:
    value = os.environ.get("SDCOMPILER_NUM_THREADS")
    return int(value) if value else None


def debug() -> bool:
    return os.environ.get("SDCOMPILER_DEBUG", "0") not in ("", "0", "false")


def quiet() -> bool:
    return os.environ.get("SDCOMPILER_QUIET", "0") not in ("", "0", "false")


def set_quiet(value: bool) -> None:
    os.environ["SDCOMPILER_QUIET"] = "1" if value else "0"
