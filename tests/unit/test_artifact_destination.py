"""Output folders lose nothing: only an sd-compiler artifact (its own files and nothing else) is replaced, and a
run killed at any point leaves debris that the next run into the same folder restores or removes. Loading reads
nothing outside the artifact: file names from the manifest and from sharded-weight indexes stay inside it.

These run the artifact functions and the CLI's refusal directly: no model is built.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdcompiler.artifact import (
    check_destination,
    hash_files,
    staged_artifact,
    staged_folder,
    verify_files,
    write_manifest,
)
from sdcompiler.cli import main
from sdcompiler.errors import ArtifactError


def _artifact(folder: Path, content: str = "old") -> Path:
    """A folder as compile_artifact leaves it: files, then a manifest listing them."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_text(content)
    write_manifest(folder, {"sdcompiler_version": "0.1.0", "arch": "sd15"})
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_folder_whose_manifest_sdcompiler_did_not_write_is_refused_and_kept(tmp_path, capsys):
    """The issue's case: an application folder that happens to have a manifest.json."""
    app = tmp_path / "v"
    (app / "src").mkdir(parents=True)
    (app / "src" / "main.py").write_text("print('app')")
    (app / "manifest.json").write_text('{"name": "app"}')
    (app / "precious.txt").write_text("x")
    code = main(
        ["compile", str(tmp_path / "no-such-checkpoint"), "--recipe", "none", "--target", "torch", "--out", str(app)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "sd-compiler did not write" in err
    assert sorted(hash_files(app)) == ["precious.txt", "src/main.py"]  # everything still there


def test_an_artifact_with_a_foreign_file_in_it_is_refused(tmp_path):
    out = _artifact(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "unet" / "backup.bin").write_text("mine too")
    with pytest.raises(ArtifactError, match=r"not part of the artifact there \(notes.txt, unet/backup.bin\)"):
        check_destination(out)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "manifest",
    [
        "[]",
        "null",
        "{",
        '{"schema_version": "1", "sdcompiler_version": "0.1"}',
        '{"schema_version": 1, "files": {}}',
        '{"schema_version": 1, "sdcompiler_version": "0.1.0", "files": []}',
    ],
)
def test_manifests_that_are_not_sdcompilers_are_refused(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    with pytest.raises(ArtifactError, match="did not write"):
        check_destination(out)


def test_an_artifact_is_replaced_atomically(tmp_path):
    out = _artifact(tmp_path / "out")
    check_destination(out)  # its own files only: may be replaced
    with staged_artifact(out) as staging:
        _artifact(staging, "new")
    assert (out / "unet" / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_leftovers_of_dead_processes_are_restored_or_removed_with_a_line_each(tmp_path, caplog):
    out = tmp_path / "out"
    dead = _dead_pid()
    _artifact(tmp_path / f".out.old-{dead}-abc")  # killed between the renames: nothing at out
    (tmp_path / f".out.partial-{dead}-def").mkdir()  # killed while staging
    live = tmp_path / f".out.partial-{os.getpid()}-ghi"  # a run still going (this process): left alone
    live.mkdir()
    with caplog.at_level(logging.WARNING, logger="sdcompiler.artifact"):
        check_destination(out)
    assert (out / "unet" / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "restored" in lines[0] and "staging folder" in lines[1]


def test_an_old_artifact_next_to_a_present_one_is_removed(tmp_path, caplog):
    out = _artifact(tmp_path / "out", "current")
    _artifact(tmp_path / f".out.old-{_dead_pid()}-abc")
    with caplog.at_level(logging.WARNING, logger="sdcompiler.artifact"):
        check_destination(out)
    assert (out / "unet" / "weights.bin").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and "removed" in caplog.records[0].getMessage()


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sdcompiler.artifact import staged_folder, write_manifest

    out = Path(sys.argv[1])
    rename = Path.rename

    def rename_then_die(self, target):
        result = rename(self, target)
        if ".old-" in Path(target).name:  # the old artifact is aside; the new one is not in place yet
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Path.rename = rename_then_die
    with staged_folder(out) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "weights.bin").write_text("new")
        write_manifest(staging, {"sdcompiler_version": "0.1.0"})
""")


def test_a_sigkill_between_the_two_renames_loses_nothing(tmp_path):
    """A real SIGKILL at the worst moment: the old artifact is aside, nothing is at the destination. The next
    run puts the old artifact back before anything else, and its own replace then completes."""
    out = _artifact(tmp_path / "out", "old")
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the state the kill left
    check_destination(out)
    assert (out / "unet" / "weights.bin").read_text() == "old"  # restored, hashes as the manifest says
    manifest = json.loads((out / "manifest.json").read_text())
    assert hash_files(out) == manifest["files"]
    with staged_folder(out) as staging:
        _artifact(staging, "again")
    assert (out / "unet" / "weights.bin").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- every path read from an artifact stays inside it ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/hostname", "unet/../../outside.bin", "a\\..\\b", ""])
def test_manifest_file_names_outside_the_artifact_are_refused(tmp_path, name):
    root = _artifact(tmp_path / "art")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify_files(root, manifest)


def test_a_link_out_of_the_artifact_is_refused(tmp_path):
    root = _artifact(tmp_path / "art")
    (tmp_path / "secret.txt").write_text("not the artifact's")
    (root / "unet" / "leak.bin").symlink_to(tmp_path / "secret.txt")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["unet/leak.bin"] = "0" * 64
    with pytest.raises(ArtifactError, match="links outside the artifact"):
        verify_files(root, manifest)


@pytest.mark.parametrize("weight_file", ["../../../etc/passwd", "/etc/hostname"])
def test_weight_indexes_pointing_outside_are_refused(tmp_path, weight_file):
    """transformers and diffusers open what a sharded-weight index names: the load checks it first."""
    root = _artifact(tmp_path / "art")
    (root / "text_encoder").mkdir()
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001.safetensors", "b.weight": weight_file}}
    (root / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    manifest = json.loads((root / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match=r"weight file in text_encoder/model.safetensors.index.json"):
        verify_files(root, manifest)


def test_an_intact_artifact_verifies(tmp_path):
    root = _artifact(tmp_path / "art")
    verify_files(root, json.loads((root / "manifest.json").read_text()))
