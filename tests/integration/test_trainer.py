"""The shared trainer: 2 processes (gloo) = 1 process at the same global batch; an interrupted run resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "jobs" / "train_toy.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, str(JOB)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(JOB),
        ]
    proc = subprocess.run([*command, "--out", str(out), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _losses(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, grad_accum):
    _run(tmp_path / "one.json", "--grad-accum", str(grad_accum))
    _run(tmp_path / "two.json", "--grad-accum", str(grad_accum), processes=2)
    one, two = _losses(tmp_path / "one.json"), _losses(tmp_path / "two.json")
    assert one["world"] == 1 and two["world"] == 2
    assert one["losses"][-1] < 0.6 * one["losses"][0]  # it trains
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path):
    _run(tmp_path / "clean.json", "--steps", "10")
    ckpt = ["--steps", "10", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3"]
    crashed = _run(tmp_path / "crashed.json", *ckpt, "--crash-after", "7", check=False)
    assert crashed.returncode == 3 and not (tmp_path / "crashed.json").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-000003", "step-000006"]
    _run(tmp_path / "resumed.json", *ckpt)
    clean, resumed = _losses(tmp_path / "clean.json"), _losses(tmp_path / "resumed.json")
    assert resumed["resumed_from"] == 6
    assert resumed["losses"] == pytest.approx(clean["losses"], rel=1e-5)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    _run(tmp_path / "a.json", "--steps", "4", *ckpt)
    _run(tmp_path / "b.json", "--steps", "4", "--batch-size", "4", *ckpt)
    assert _losses(tmp_path / "b.json")["resumed_from"] == 0


def test_torchrun_compile_with_distill_matches_one_process(tiny_checkpoint, tmp_path):
    """`torchrun -m sdcompiler compile ... distill`: both ranks train, rank 0 writes; same result as 1 process."""
    ckpt = str(tiny_checkpoint("sd15"))
    metrics = {}
    for processes in (1, 2):
        out = tmp_path / f"art{processes}"
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            SDCOMPILER_QUIET="1",
            SDCOMPILER_CACHE_DIR=str(tmp_path / f"cache{processes}"),
        )  # no shared checkpoints to resume
        launcher = (
            [sys.executable]
            if processes == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={processes}",
                "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}",
            ]
        )
        proc = subprocess.run(
            [
                *launcher,
                "-m",
                "sdcompiler",
                "compile",
                ckpt,
                "--recipe",
                "bk-small,distill",
                "--target",
                "torch",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics[processes] = json.loads((out / "manifest.json").read_text())["passes"][1]["metrics"]
    assert metrics[2]["resumed_from_step"] == 0
    assert metrics[2]["sqnr_after_db"] == pytest.approx(metrics[1]["sqnr_after_db"], abs=1e-3)
    assert metrics[2]["loss_last"] == pytest.approx(metrics[1]["loss_last"], rel=1e-3)
