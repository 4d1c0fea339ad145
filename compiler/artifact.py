"""Artifact folders: written atomically, described by `manifest.json`.

An artifact is built in a temporary sibling folder (`.NAME.partial-*`) and
renamed into place only once every file and the manifest are written, so a
crash or an error never leaves a half-written artifact at the destination.
An existing artifact at the destination is replaced; any other non-empty
folder is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sdcompiler.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_destination(output_dir: Path) -> None:
    """Fail early (before any work) when `output_dir` holds something that is not an artifact."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ArtifactError(f"output {output_dir} is a file; pass a folder path")
        if any(output_dir.iterdir()) and not (output_dir / MANIFEST).exists():
            raise ArtifactError(
                f"output folder {output_dir} is not empty and is not an sd-compiler artifact; "
                "pass a new or empty folder"
            )


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder next to `output_dir`; on success it atomically becomes `output_dir`
    (replacing what was there), on failure it is removed and `output_dir` is left as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700: a serving user other than the compiler's must read it
    try:
        yield staging
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            output_dir.rename(old)
        staging.rename(output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_artifact(output_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success (a manifest written) it atomically becomes `output_dir`."""
    output_dir = Path(output_dir).resolve()
    check_destination(output_dir)
    with staged_folder(output_dir) as staging:
        yield staging
        if not (staging / MANIFEST).exists():
            raise ArtifactError(f"internal error: no {MANIFEST} written for {output_dir}")


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, by relative POSIX path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": hash_files(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    file = root / MANIFEST
    if not root.exists():
        raise ArtifactError(f"artifact folder {root} does not exist; compile one with `sdcompiler compile`")
    if not file.is_file():
        raise ArtifactError(
            f"{root} is not an sd-compiler artifact (no {MANIFEST}); compile one with `sdcompiler compile`"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); recompile the artifact"
        ) from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{file} has schema_version {version!r}; this sd-compiler reads {SCHEMA_VERSION}: recompile"
        )
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check that every file listed in the manifest is present.

    Hashes are not recomputed at load (seconds per GB); `sdcompiler inspect` shows them.
    """
    missing = [name for name in manifest.get("files", {}) if not (root / name).is_file()]
    if missing:
        raise ArtifactError(f"artifact {root} is incomplete: missing {', '.join(missing[:3])}; recompile it")
