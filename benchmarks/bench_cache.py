"""The report's cached inputs: the source checkpoint, our compiled artifacts, optimum's ONNX export and ONNX
Runtime's own INT8 quantization of it, each built once under `--workdir` and reused (`make bench` with warm
caches measures only). Each build records how long it took in a sidecar `<folder>.build.json` (seconds, peak
RSS and CPU seconds of the process that built it, the command), so a cached rerun still reports the first
run's build time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import log  # noqa: E402
from bench_compile_sd15 import run_measured  # noqa: E402


def sidecar(folder: Path) -> Path:
    return folder.with_name(folder.name + ".build.json")


def cached_build(folder: Path, done: Path) -> dict | None:
    """The recorded build of `folder` when it is complete (`done` exists) and its sidecar too, else None."""
    if done.exists() and sidecar(folder).is_file():
        return {**json.loads(sidecar(folder).read_text()), "cached": True}
    return None


def build_in_subprocess(folder: Path, command: list[str], what: str, env: dict | None = None) -> dict:
    """Run `command` (which writes `folder`), measured; write the sidecar; raise RuntimeError with the output's
    tail when it fails."""
    log(f"building {what}: {' '.join(command[1:])}")
    result = run_measured(command, env=dict(os.environ, SDCOMPILER_QUIET="1", **(env or {})))
    tail = result.pop("output_tail")
    if result["exit_code"] != 0:
        raise RuntimeError(f"{what} failed (exit {result['exit_code']}): {tail.strip().splitlines()[-1:]}")
    result["command"] = " ".join(Path(c).name if c == sys.executable else c for c in command)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sidecar(folder).write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def ensure_checkpoint(workdir: Path, size: str) -> tuple[Path, dict]:
    """`make_checkpoint(DIR, "sd15", size, seed=0)` once under `workdir`."""
    folder = workdir / f"sd15-{size}"
    found = cached_build(folder, folder / "model_index.json")
    if found:
        return folder, found
    code = (
        "import sys; from sdcompiler.testing import make_checkpoint; "
        f"make_checkpoint(sys.argv[1], 'sd15', {size!r}, seed=0, overwrite=True)"
    )
    return folder, build_in_subprocess(folder, [sys.executable, "-c", code, str(folder)], f"the {size} checkpoint")


def ensure_artifact(checkpoint: Path, recipe: str, target: str, workdir: Path) -> tuple[Path, dict]:
    """`sdcompiler compile CKPT --recipe R --target T --out DIR` once (an empty cache dir: calibration and
    teacher data are part of the first compile's time)."""
    folder = workdir / "artifacts" / checkpoint.name / f"{recipe}-{target}"
    found = cached_build(folder, folder / "manifest.json")
    if found:
        return folder, found
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "compile-cache" / f"{recipe}-{target}"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [sys.executable, "-m", "sdcompiler", "compile", str(checkpoint), "--recipe", recipe]
    command += ["--target", target, "--out", str(folder), "--quiet"]
    shutil.rmtree(folder, ignore_errors=True)
    try:
        return folder, build_in_subprocess(
            folder, command, f"{recipe} -> {target}", env={"SDCOMPILER_CACHE_DIR": str(scratch)}
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_optimum_export(checkpoint: Path, workdir: Path) -> tuple[Path, dict]:
    """optimum's own exporter (`optimum.exporters.onnx.main_export`, fp32, CPU) of the checkpoint."""
    folder = workdir / "optimum" / checkpoint.name / "fp32"
    found = cached_build(folder, folder / "unet" / "model.onnx")
    if found:
        return folder, found
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys; from optimum.exporters.onnx import main_export; "
        "main_export(sys.argv[1], output=sys.argv[2], task='text-to-image', device='cpu', no_post_process=False)"
    )
    return folder, build_in_subprocess(
        folder, [sys.executable, "-c", code, str(checkpoint), str(folder)], "optimum's ONNX export"
    )


def ensure_ort_int8(export: Path, checkpoint: Path, workdir: Path, prompts: list[str], steps: int) -> tuple[Path, dict]:
    """ONNX Runtime's `quantize_static` of optimum's U-Net export (the peer of our `int8`): the other
    components are the export's (linked), the U-Net is quantized with calibration inputs taken from the fp32
    export's own sampling of `prompts` (CFG, `steps` steps, the report's size)."""
    folder = workdir / "optimum" / checkpoint.name / "ort-int8"
    found = cached_build(folder, folder / "unet" / "model.onnx")
    if found:
        return folder, found
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, str(HERE / "bench_ort_int8.py"), str(export), str(folder), "--steps", str(steps)]
    for prompt in prompts:
        command += ["--prompt", prompt]
    return folder, build_in_subprocess(folder, command, "ONNX Runtime quantize_static INT8")
