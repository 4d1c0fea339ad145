"""Fingerprints of compiled artifacts, to prove a refactor changed no output.

Compiles a fixed set of (recipe, target) cases on the tiny SD1.5 checkpoint (seed 0) and records, per
artifact, the sha256 of every file and of the manifest with its timing fields (`seconds`, `passes_seconds`)
and the machine-dependent `source.path` removed. Two runs of the same code give the same fingerprints, so a
difference after a change means the change altered an artifact.

    python benchmarks/artifact_fingerprints.py --out benchmarks/results/artifact_fingerprints.json
    python benchmarks/artifact_fingerprints.py --compare benchmarks/results/artifact_fingerprints.json
    python benchmarks/artifact_fingerprints.py --training --compare benchmarks/results/artifact_fingerprints_training.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("SDCOMPILER_QUIET", "1")
os.environ.setdefault("SDCOMPILER_NUM_THREADS", "1")

CASES = {
    "none/onnx": ("none", "onnx"),
    "bk-small/onnx": ("bk-small", "onnx"),
    "int8/onnx": ("int8", "onnx"),
    "quest-w4a4/torch": ("quest-w4a4", "torch"),
}
# `--training`: every training pass at a tiny budget (torch target), for changes to the training scaffold
_TINY = {
    "steps": 2,
    "batch_size": 2,
    "num_prompts": 2,
    "held_out_prompts": 1,
    "teacher_steps": 2,
    "checkpoint_every": 0,
}
TRAINING_CASES = {
    "bk-small+distill/torch": (["bk-small", {"preset": "distill", **_TINY, "incubation_steps": 1}], "torch"),
    "cfg-distill/torch": ([{"preset": "cfg-distill", **_TINY, "image_steps": 2}], "torch"),
    "lcm/torch": ([{"preset": "lcm", **_TINY, "num_ddim_timesteps": 10, "reference_steps": 2}], "torch"),
}
TIMING_KEYS = {"seconds", "passes_seconds"}


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 per file (the manifest without timings or the source's local path)."""
    from sdcompiler.artifact import MANIFEST, hash_files

    manifest = json.loads((root / MANIFEST).read_text())
    manifest.get("source", {}).pop("path", None)
    manifest.pop("versions", None)  # package versions: same code may run under other installs
    normalized = json.dumps(_strip_timing(manifest), sort_keys=True).encode()
    return {MANIFEST: hashlib.sha256(normalized).hexdigest(), **hash_files(root)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", type=Path, help="compare with fingerprints written before; exit 1 on change")
    parser.add_argument("--training", action="store_true", help="the training passes' cases instead")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from sdcompiler.compile import compile_artifact
    from sdcompiler.testing import make_checkpoint

    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a cache of its own: teacher data, calibration trajectories and ptq graphs are made by the code under test,
        # never reused from an earlier run of other code (their cache keys do not name the code)
        os.environ["SDCOMPILER_CACHE_DIR"] = str(Path(tmp) / "cache")
        ckpt = make_checkpoint(Path(tmp) / "sd15", "sd15", "tiny", seed=0)
        for key, (recipe, target) in (TRAINING_CASES if args.training else CASES).items():
            print(f"compiling {key}", file=sys.stderr, flush=True)
            root = compile_artifact(
                ckpt, recipe=recipe, target=target, output_dir=Path(tmp) / key.replace("/", "-"), show_progress=False
            )
            results[key] = fingerprint(root)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = 0
        for key in sorted(set(before) | set(results)):
            old, new = before.get(key, {}), results.get(key, {})
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    changed += 1
                    print(f"CHANGED {key}: {name} {old.get(name, '-')[:12]} -> {new.get(name, '-')[:12]}")
        print(f"{changed} file(s) differ in {len(results)} artifacts")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
