"""Artifact folders: written atomically, described by `manifest.json`.

An artifact is built in a temporary sibling folder (`.NAME.partial-<pid>-*`)
and renamed into place only once every file and the manifest are written, so
a crash or an error never leaves a half-written artifact at the destination.
An existing artifact at the destination is replaced (moved aside to
`.NAME.old-<pid>-*`, then removed) only when it is one: its manifest is an
sd-compiler manifest and every file in the folder is one the manifest lists.
Anything else that is not empty is refused, so no user file is ever deleted.

A process killed mid-way leaves its staging folder, or (between the two
renames of a replace) the old artifact moved aside and nothing at the
destination. The next compile or export into the same destination restores
the old artifact or removes the debris, with one line on stderr saying so;
folders whose owning process (the pid in their name) still runs are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sdcompiler.errors import ArtifactError
from sdcompiler.passes.errors import path_problem, resolved_path

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# a leftover without a pid in its name (written by an older sd-compiler) counts as abandoned after this long
STALE_SECONDS = 3600
# manifests are a few KB; a bigger one is not ours (and is not read into memory)
MAX_MANIFEST_BYTES = 16 << 20

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_destination(output_dir: Path) -> None:
    """Fail early (before any work) unless `output_dir` is new, empty, or an artifact (whose own files only)
    that may be replaced, and a staging folder can be written next to it; first restore or clean what an
    interrupted earlier run left next to it."""
    output_dir = resolved_path(output_dir, ArtifactError, "pass a folder path")
    check_writable_destination(output_dir)
    recover_interrupted(output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not (output_dir / MANIFEST).is_file():
        raise ArtifactError(
            f"output folder {output_dir} is not empty and is not an sd-compiler artifact; pass a new or empty folder"
        )
    listed = _listed_files(output_dir / MANIFEST)
    if listed is None:
        raise ArtifactError(
            f"output folder {output_dir} holds a {MANIFEST} that sd-compiler did not write; refusing to replace "
            "it: pass a new or empty folder"
        )
    foreign = [name for name in _files_below(output_dir) if name != MANIFEST and name not in listed]
    if foreign:
        raise ArtifactError(
            f"output folder {output_dir} holds files that are not part of the artifact there "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); refusing to replace it: move them "
            "or pass a new folder"
        )


def check_writable_destination(output_dir: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written the way `staged_folder` writes: a file or
    special file, a mount point (busy: it cannot be renamed, and a replace renames), a read-only folder, or a
    place where no staging folder can be created (a read-only or full file system, /proc, a file's path).

    The parent is tested by creating (and removing) an empty staging folder there: permission bits alone miss
    read-only mounts, immutable folders, and pseudo file systems where even root cannot create entries."""
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            kind = "is a file" if output_dir.is_file() else path_problem(output_dir)
            raise ArtifactError(f"output {output_dir} {kind}; pass a folder path")
        if _mount_point(output_dir):
            raise ArtifactError(
                f"output {output_dir} is a mount point, which cannot be renamed (the output is swapped in by "
                "renaming); pass a new folder inside it"
            )
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot replace {output_dir}: it is read-only; pass a folder you can write")
    parent = next(p for p in output_dir.parents if p.exists() or p.is_symlink())
    if not parent.is_dir():
        raise ArtifactError(
            f"cannot create {output_dir}: {parent} {path_problem(parent)}, not a folder; pass a folder path"
        )
    try:
        probe = tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=parent)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ArtifactError(
            f"cannot write {output_dir}: {parent} is not writable ({reason}); pass a folder you can write"
        ) from None
    os.rmdir(probe)


def _mount_point(folder: Path) -> bool:
    """Whether `folder` is a mount point, bind mounts of a folder of the same file system included (which
    `os.path.ismount` misses): a rename of one fails with EBUSY."""
    if os.path.ismount(folder):
        return True
    try:
        with open("/proc/self/mountinfo") as mounts:  # field 5: the mount point, with spaces as \\040
            points = {line.split()[4].replace("\\040", " ") for line in mounts if len(line.split()) > 4}
    except OSError:  # not Linux
        return False
    return str(folder) in points


def _listed_files(manifest_file: Path) -> set[str] | None:
    """The files an sd-compiler manifest lists, or None when the file is not an sd-compiler manifest."""
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        return None
    files = manifest.get("files")
    if not isinstance(manifest.get("sdcompiler_version"), str) or not isinstance(files, dict):
        return None
    return {name for name in files if isinstance(name, str)}


def _files_below(root: Path) -> list[str]:
    """Every file and link below `root` (links not followed), as POSIX paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(root):
        base = Path(folder)
        found += [(base / name).relative_to(root).as_posix() for name in files]
        found += [(base / name).relative_to(root).as_posix() for name in dirs if (base / name).is_symlink()]
    return sorted(found)


def _owner_alive(leftover: Path, kind: str, name: str) -> bool:
    """Whether the process that made `leftover` (`.NAME.<kind>-<pid>-<random>`) may still be using it."""
    pid = leftover.name[len(f".{name}.{kind}-") :].split("-", 1)[0]
    if not pid.isdigit():  # an older sd-compiler's name: abandoned once it is old enough
        return time.time() - leftover.stat().st_mtime < STALE_SECONDS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover_interrupted(output_dir: Path) -> None:
    """Undo what a killed compile or export left next to `output_dir`: an artifact moved aside by a replace
    that never finished goes back when nothing is at `output_dir` (otherwise it is removed); abandoned staging
    folders are removed. Each action is reported on one line (logging, to stderr by default)."""
    parent, name = output_dir.parent, output_dir.name
    if not parent.is_dir():
        return
    for old in sorted(parent.glob(f".{glob.escape(name)}.old-*")):
        if not old.is_dir() or _owner_alive(old, "old", name):
            continue
        if not output_dir.exists() and not output_dir.is_symlink():
            old.rename(output_dir)
            log.warning("restored %s from %s, where an interrupted replace had moved it", output_dir, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
            log.warning(
                "removed %s, the previous artifact an interrupted replace left next to %s", old.name, output_dir
            )
    for partial in sorted(parent.glob(f".{glob.escape(name)}.partial-*")):
        if partial.is_dir() and not _owner_alive(partial, "partial", name):
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("removed %s, the staging folder of an interrupted run into %s", partial.name, output_dir)


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder next to `output_dir`; on success it atomically becomes `output_dir`
    (replacing what was there), on failure it is removed and `output_dir` is left as it was.

    A full disk, an exceeded quota or a file system gone read-only, wherever the writing hits it (our code,
    safetensors, torch, onnx), becomes one `ArtifactError` naming the folder and the fix."""
    staging = None
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(output_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700: a serving user other than the compiler's must read it
        yield staging
        _swap_in(staging, output_dir)
    except Exception as exc:
        reason = _disk_failure(exc)
        if reason is None:
            raise
        raise ArtifactError(
            f"cannot write {output_dir}: {reason}; free space there or pass another --out (nothing was written)"
        ) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# how often a finished staging folder is swapped in again when other runs into the same folder keep swapping
# theirs in between our two renames
SWAP_ATTEMPTS = 20


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Rename `staging` to `output_dir`, moving what is there aside first and removing it after.

    Runs into one folder at once: another run may move the artifact aside, or put its own in place, between
    our two renames; then ours is swapped in again, so the last run to finish wins and the folder always holds
    one complete artifact. A kill between the renames leaves `old`, which `recover_interrupted` puts back."""
    suffix = staging.name[len(f".{output_dir.name}.partial-") :]  # <pid>-<random>
    old = output_dir.with_name(f".{output_dir.name}.old-{suffix}")
    for _ in range(SWAP_ATTEMPTS):
        moved_aside = False
        if output_dir.exists():
            try:
                output_dir.rename(old)
                moved_aside = True
            except FileNotFoundError:  # another run moved it aside just now
                continue
            except OSError as exc:
                raise ArtifactError(f"cannot replace {output_dir} ({exc.strerror}); pass another --out") from None
        try:
            staging.rename(output_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run swapped its own in meanwhile
                if moved_aside:
                    shutil.rmtree(old, ignore_errors=True)
                continue
            if moved_aside:
                old.rename(output_dir)  # the previous artifact stays
            raise ArtifactError(
                f"cannot move the new artifact into {output_dir} ({exc.strerror}); pass another --out"
            ) from None
        if moved_aside:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise ArtifactError(f"other runs kept replacing {output_dir} while this one finished; pass another --out")


# errors of the disk rather than of the data: where a write fails with one of these, the fix is another folder
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


def _disk_failure(exc: BaseException) -> str | None:
    """What `DISK_ERRORS` says about `exc` or an exception it was raised from, or None. Libraries that write
    through their own code (safetensors, torch's zip writer, protobuf) raise their own types; their messages
    carry the system's text ("No space left on device"), which is matched too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            return DISK_ERRORS[exc.errno]
        text = str(exc)
        for number, reason in DISK_ERRORS.items():
            if os.strerror(number) in text:
                return reason
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def staged_artifact(output_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success (a manifest written) it atomically becomes `output_dir`."""
    output_dir = resolved_path(output_dir, ArtifactError, "pass a folder path")
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
    """Write `manifest.json` (strict JSON: a NaN or Inf anywhere in it is refused, naming where) with the sha256
    of every file under `root`."""
    bad = _nonfinite(manifest)
    if bad:
        raise ArtifactError(
            f"the compile produced a non-finite number at {bad} in the manifest; the checkpoint or a pass "
            "gave NaN/Inf: check the checkpoint's weights and the pass's settings"
        )
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": hash_files(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _nonfinite(value: Any, where: str = "") -> str | None:
    """The key path of the first NaN / Inf float in `value` (nested dicts and lists), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the top level"
    if isinstance(value, dict):
        items = ((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next((found for path, item in items if (found := _nonfinite(item, path))), None)


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    file = root / MANIFEST
    if not root.is_dir():
        problem = path_problem(root)
        if problem == "is a regular file":
            problem = "is a file, not an artifact folder"
        raise ArtifactError(f"artifact folder {root} {problem}; compile one with `sdcompiler compile`")
    if not file.is_file():
        raise ArtifactError(
            f"{root} is not an sd-compiler artifact (no {MANIFEST}); compile one with `sdcompiler compile`"
        )
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{file} is {file.stat().st_size / 1e6:.0f} MB, far beyond any manifest sd-compiler writes; recompile "
            "the artifact"
        )
    try:
        manifest = json.loads(file.read_text(), parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); recompile the artifact"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{file} is not strict JSON ({exc}); recompile the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(
            f"{file} holds a JSON {type(manifest).__name__}, not an sd-compiler manifest; recompile the artifact"
        )
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{file} has schema_version {version!r}; this sd-compiler reads {SCHEMA_VERSION}: recompile"
        )
    problem = _shape_problem(manifest)
    if problem:
        raise ArtifactError(f"{file}: {problem}; the manifest was edited or damaged: recompile the artifact")
    bad = [name for name, digest in manifest["files"].items() if not _is_sha256(digest)]
    if bad:
        raise ArtifactError(f"{file}: the sha256 of {bad[0]!r} is not a sha256 hex digest; recompile the artifact")
    return manifest


# what every reader of a manifest relies on (load_compiled, export-server, inspect), and its type
MANIFEST_KEYS = {
    "sdcompiler_version": str,
    "arch": str,
    "target": str,
    "source": dict,
    "passes": list,
    "lowering": dict,
    "files": dict,
}
PASS_RECORD_KEYS = {
    "name": str,
    **dict.fromkeys(("params_before", "params_after", "macs_before", "macs_after"), int),
    "seconds": (int, float),
}
STAGE_KEYS = {"name": str, "seconds": (int, float)}


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a manifest, or None."""

    def wrong(where: str, mapping: Any, keys: dict[str, Any]) -> str | None:
        if not isinstance(mapping, dict):
            return f"{where} is a {type(mapping).__name__}, not a mapping"
        for key, kind in keys.items():
            value = mapping.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                found = "missing" if key not in mapping else f"a {type(value).__name__}"
                return f"{f'{where}.' if where else ''}{key} is {found}"
        return None

    lowering = manifest.get("lowering")
    checks = [("", manifest, MANIFEST_KEYS)]
    passes = manifest.get("passes") if isinstance(manifest.get("passes"), list) else []
    checks += [(f"passes[{i}]", record, PASS_RECORD_KEYS) for i, record in enumerate(passes)]
    if isinstance(lowering, dict):
        checks.append(("lowering", lowering, {"config": dict, "stages": list}))
        stages = lowering.get("stages") if isinstance(lowering.get("stages"), list) else []
        checks += [(f"lowering.stages[{i}]", stage, STAGE_KEYS) for i, stage in enumerate(stages)]
    return next((problem for where, mapping, keys in checks if (problem := wrong(where, mapping, keys))), None)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def confined(root: Path, name: str, what: str = "a file name") -> Path:
    """`root / name`, refused unless it stays inside `root`: a relative path without `..` that resolves (links
    followed) below `root`. Every path read from an artifact goes through this, so a tampered manifest or index
    cannot make a load open /etc/passwd."""
    relative = Path(name) if isinstance(name, str) else None
    if relative is None or not name or relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise ArtifactError(f"artifact {root}: {what} {name!r} points outside the artifact; recompile it")
    path = root / relative
    base = root.resolve()
    if path.exists() and not path.resolve().is_relative_to(base):
        raise ArtifactError(f"artifact {root}: {what} {name!r} links outside the artifact; recompile it")
    return path


# index files that map tensor names to the files holding them (transformers' and diffusers' sharded weights)
WEIGHT_INDEXES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")


def verify_files(root: Path, manifest: dict[str, Any], *, hashes: bool = True) -> VerifyReport:
    """Check an artifact against its manifest before anything is loaded from it; raise an ArtifactError naming the
    first file that fails.

    - every listed file is present and inside the artifact (and so are the weight files that sharded-weight
      indexes name);
    - with `hashes` (the default), every listed file's sha256 matches the manifest (files hashed in parallel
      threads; hashlib releases the GIL, so this runs at disk / memory speed);
    - every ONNX graph uses only the standard operator domains (plus its own local functions) and keeps its
      external data inside the artifact.
    """
    start = time.perf_counter()
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"artifact {root}: the manifest's files is not a mapping; recompile it")
    missing = [name for name in files if not confined(root, name).is_file()]
    if missing:
        raise ArtifactError(f"artifact {root} is incomplete: missing {', '.join(missing[:3])}; recompile it")
    for index in sorted(p for name in WEIGHT_INDEXES for p in root.rglob(name)):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ArtifactError(
                f"artifact {root}: {index.relative_to(root)} is not a weight index; recompile it"
            ) from None
        where = index.parent.relative_to(root).as_posix()
        for file in set(weight_map.values()) if isinstance(weight_map, dict) else [weight_map]:
            confined(index.parent, file, f"the weight file in {where}/{index.name}")
    size = sum((root / name).stat().st_size for name in files)
    if hashes:
        _check_hashes(root, files)
    graphs = sorted(name for name in files if name.endswith(".onnx"))
    for name in graphs:
        check_onnx_graph(root, name, files)
    return VerifyReport(len(files), size, hashes, len(graphs), time.perf_counter() - start)


@dataclass(frozen=True)
class VerifyReport:
    files: int
    bytes: int
    hashed: bool
    onnx_graphs: int
    seconds: float


def _check_hashes(root: Path, files: dict[str, str]) -> None:
    names = sorted(files, key=lambda name: -(root / name).stat().st_size)  # biggest first: best balance
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = dict(zip(names, pool.map(lambda name: sha256_file(root / name), names)))
    changed = [name for name in sorted(files) if digests[name] != files[name]]
    if changed:
        raise ArtifactError(
            f"artifact {root}: {changed[0]} does not match the sha256 in its manifest"
            f"{f' (and {len(changed) - 1} more file(s))' if len(changed) > 1 else ''}: the file was changed or "
            "damaged after the compile; recompile or restore the artifact (or load with verify=False / --no-verify "
            "to skip the check)"
        )


# operator domains ONNX Runtime implements itself; any other domain needs a custom-op library
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview"})


def check_onnx_graph(root: Path, name: str, files: dict[str, str]) -> None:
    """Refuse an ONNX graph (`root / name`) whose nodes use an operator domain ONNX Runtime does not implement
    (a custom-op library would be needed: code from outside the artifact) or whose external data lives outside
    the artifact or is not a file the manifest lists (and so hashes). Reads the graph only, never the weights."""
    import onnx

    path = confined(root, name)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / ValueError / google.protobuf errors
        raise ArtifactError(f"artifact {root}: {name} is not a valid ONNX graph ({exc}); recompile it") from None
    local = {function.domain for function in model.functions}
    nodes = [node for graph in _graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    unknown = sorted({node.domain for node in nodes} - ONNX_DOMAINS - local)
    if unknown:
        raise ArtifactError(
            f"artifact {root}: {name} uses operator domain {unknown[0]!r}, which needs a custom-op library; "
            "sd-compiler writes none: recompile the artifact"
        )
    folder = Path(name).parent
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            relative = (folder / location).as_posix() if location and not Path(location).is_absolute() else location
            confined(root, relative, f"the external data of {tensor.name!r} in {name},")
            if relative not in files:
                raise ArtifactError(
                    f"artifact {root}: the external data of {tensor.name!r} in {name} ({location}) is not a file "
                    "its manifest lists; recompile the artifact"
                )


def _graphs(graph) -> Iterator[Any]:
    """`graph` and every subgraph (If / Loop / Scan bodies) below it."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node or attribute.g.initializer:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)
