"""Faults (issue 14, item 6): a compile killed at any stage, two compiles into one folder at once, and a full
disk each leave the previous artifact (every file's sha256 as its manifest lists) or none, never a mixed folder,
and no debris a later compile trips over.

Kills are real SIGKILLs of `python -m sdcompiler compile` processes, timed by what the file system shows (no
hook in the library): the checkpoint's U-Net weights mapped in /proc/<pid>/maps with nothing staged yet (loading
and pass work), a staging folder with files but no manifest (export), or, from a test-side script that wraps
`Path.rename`, a finished staging folder about to be swapped in.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdcompiler.artifact import hash_files, staged_folder, write_manifest
from sdcompiler.cli import main
from sdcompiler.errors import ArtifactError


def _verifies(out: Path) -> dict:
    """The artifact at `out` is whole: every file hashes as its manifest lists, and no file is unlisted."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert hash_files(out) == manifest["files"]
    return manifest


def _old_artifact(compiled, folder: Path) -> Path:
    import shutil

    return Path(shutil.copytree(compiled("sd15", target="torch").root, folder / "out"))


def _compile_argv(checkpoint: Path, out: Path, recipe: str = "none", target: str = "torch", *extra: str) -> list[str]:
    return ["compile", str(checkpoint), "--recipe", recipe, "--target", target, "--out", str(out), *extra]


def _start(argv: list[str], script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "sdcompiler", *argv]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _writing(staging: Path) -> bool:
    """Files in the staging folder and no manifest yet. The folder may be swapped in (renamed away) between the
    glob that found it and this look: that is 'not now', not an error."""
    try:
        return any(staging.iterdir()) and not (staging / "manifest.json").exists()
    except FileNotFoundError:
        return False


def _weights_mapped(pid: int, checkpoint: Path) -> bool:
    try:
        return str(checkpoint / "unet") in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# A compile whose process dies the moment its finished staging folder (manifest written) is about to replace
# the artifact at the destination: test-side code, the library has no hook for it.
KILLED_BEFORE_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sdcompiler.cli import main

    rename = Path.rename

    def die_before_swap(self, target):
        if ".partial-" in self.name or ".old-" in Path(target).name:
            assert (self / "manifest.json").is_file() or ".old-" in Path(target).name
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)

    Path.rename = die_before_swap
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def runs(compiled, tiny_checkpoint, tmp_path_factory):
    """Every subprocess of this module, started side by side (the interpreter starts are most of the cost):
    three compiles, each SIGKILLed at one stage (loading / pass work, the ONNX export writing into the staging
    folder, just before the swap), and two compiles into one folder at once."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/<pid>/maps (Linux)")
    checkpoint = tiny_checkpoint("sd15")
    root = tmp_path_factory.mktemp("faults")
    outs = {}
    for name in ("passes", "export", "swap", "pair"):
        (root / name).mkdir()
        outs[name] = _old_artifact(compiled, root / name)
    before = {name: _verifies(out) for name, out in outs.items()}
    procs = {
        "passes": _start(_compile_argv(checkpoint, outs["passes"], "bk-small")),
        "export": _start(_compile_argv(checkpoint, outs["export"], "none", "onnx")),
        "swap": _start(_compile_argv(checkpoint, outs["swap"]), KILLED_BEFORE_SWAP),
        "pair-64": _start(_compile_argv(checkpoint, outs["pair"], "none", "torch", "--macs-resolution", "64x64")),
        "pair-96": _start(_compile_argv(checkpoint, outs["pair"], "none", "torch", "--macs-resolution", "96x96")),
    }
    conditions = {
        "passes": lambda: _weights_mapped(procs["passes"].pid, checkpoint) and not _staging(outs["passes"]),
        "export": lambda: any(_writing(s) for s in _staging(outs["export"])),
    }
    left = {}
    deadline = time.monotonic() + 300
    while conditions and time.monotonic() < deadline:
        for stage, condition in list(conditions.items()):
            if condition():
                procs[stage].send_signal(signal.SIGKILL)
                del conditions[stage]
                left[stage] = sorted(p.name for p in outs[stage].parent.iterdir())
            elif procs[stage].poll() is not None:
                pytest.fail(f"{stage}: the compile ended before the stage was seen: {procs[stage].stderr.read()}")
        time.sleep(0.002)
    assert not conditions, f"stages not reached in time: {sorted(conditions)}"
    codes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    errors = {name: proc.stderr.read()[-2000:] for name, proc in procs.items()}
    return {"checkpoint": checkpoint, "outs": outs, "before": before, "left": left, "codes": codes, "errors": errors}


@pytest.mark.parametrize("stage", ["passes", "export", "swap"])
def test_a_sigkill_keeps_the_old_artifact_and_the_next_compile_cleans_up(runs, stage):
    out = runs["outs"][stage]
    assert runs["codes"][stage] == -signal.SIGKILL, runs["errors"][stage]
    if stage != "passes":  # nothing is written before the staging folder exists
        assert _staging(out), "the kill left no staging folder: the stage was missed"
    assert _verifies(out) == runs["before"][stage]  # the old artifact, untouched
    assert main(_compile_argv(runs["checkpoint"], out, "none", "torch", "--quiet")) == 0
    _verifies(out)
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the debris is gone


def test_two_compiles_into_one_folder_end_with_one_whole_artifact(runs):
    """Both finish (exit 0); the folder holds one of the two artifacts, whole, and nothing else lies next to it."""
    assert runs["codes"]["pair-64"] == runs["codes"]["pair-96"] == 0, runs["errors"]
    out = runs["outs"]["pair"]
    assert _verifies(out)["macs_resolution"] in ([64, 64], [96, 96])
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def _small_artifact(folder: Path, content: str) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_text(content)
    write_manifest(folder, {"sdcompiler_version": "0.1.0", "arch": "sd15"})
    return folder


def test_a_run_that_swaps_in_between_our_two_renames_is_replaced_by_ours(tmp_path, monkeypatch):
    """The race the subprocess test cannot force: run B swaps its artifact in after run A moved the old one
    aside and before A's own rename. A then replaces B's: the last to finish wins, the folder is never mixed."""
    out = _small_artifact(tmp_path / "out", "old")
    rename = Path.rename
    raced = []

    def rename_with_a_race(self, target):
        result = rename(self, target)
        if ".old-" in Path(target).name and not raced:
            raced.append(True)
            with staged_folder(out) as other:  # run B, start to finish
                _small_artifact(other, "B")
            assert (out / "unet" / "weights.bin").read_text() == "B"
        return result

    monkeypatch.setattr(Path, "rename", rename_with_a_race)
    with staged_folder(out) as staging:  # run A
        _small_artifact(staging, "A")
    assert raced and (out / "unet" / "weights.bin").read_text() == "A"
    _verifies(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- a full disk --------------------------------------------------------------------------------------------


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (an artifact of the tiny model needs ~10 MB); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:80]}); see the injected test")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, small_tmpfs, capsys):
    code = main(_compile_argv(tiny_checkpoint("sd15"), small_tmpfs / "out", "none", "torch", "--quiet"))
    line = _one_line(capsys)
    assert code == 1 and "no space left" in line and str(small_tmpfs / "out") in line and "another --out" in line
    assert list(small_tmpfs.iterdir()) == []  # no staging folder, no artifact


def test_an_injected_enospc_in_the_export_is_one_line_and_leaves_nothing(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """The same without a mount (any machine): safetensors' writer raising as it does on a full disk."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    checkpoint = tiny_checkpoint("sd15")  # built (if this test runs first) before the writer breaks
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = main(_compile_argv(checkpoint, tmp_path / "out", "none", "torch", "--quiet"))
    line = _one_line(capsys)
    assert code == 1 and "no space left" in line and "another --out" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "quota"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only"),
        (RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file"), None),
    ],
)
def test_disk_errors_anywhere_in_the_staging_become_one_artifact_error(tmp_path, error, words):
    out = _small_artifact(tmp_path / "out", "old")
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = error
    with pytest.raises(ArtifactError if words else RuntimeError) as caught:
        with staged_folder(out) as staging:
            (staging / "half.bin").write_text("x")
            raise wrapped
    if words:
        message = str(caught.value)
        assert words in message and str(out) in message and "another --out" in message and "\n" not in message
    assert (out / "unet" / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
