"""One intra-op thread setting for torch and ONNX Runtime: SDCOMPILER_NUM_THREADS is applied by
`load_compiled` and `benchmark`, and ONNX Runtime sessions take torch's count whether it is set or not.

Each test restores torch's thread count (a process-wide setting); the busy-machine flag is driven by an
injected load-average reading.
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler import bench, load_compiled
from sdcompiler.bench import NoisyTimingWarning, benchmark
from sdcompiler.targets import onnx_target


@pytest.fixture(autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sessions(monkeypatch):
    """The ONNX Runtime sessions the onnx target opens from here on."""
    opened = []

    class Recorded(onnx_target.OrtModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self.session)

    monkeypatch.setattr(onnx_target, "OrtModel", Recorded)
    return opened


def test_load_compiled_applies_the_knob_to_torch_and_onnx_runtime(compiled, monkeypatch, sessions):
    artifact = compiled("sd15", "onnx").root
    sessions.clear()  # those the compile opened
    torch.set_num_threads(1)
    monkeypatch.setenv("SDCOMPILER_NUM_THREADS", "3")
    load_compiled(artifact, device="cpu", verify=False)
    assert torch.get_num_threads() == 3
    assert sessions and {s.get_session_options().intra_op_num_threads for s in sessions} == {3}


def test_without_the_knob_onnx_runtime_takes_torchs_count(compiled, monkeypatch, sessions):
    artifact = compiled("sd15", "onnx").root
    sessions.clear()
    monkeypatch.delenv("SDCOMPILER_NUM_THREADS")
    torch.set_num_threads(1)
    load_compiled(artifact, device="cpu", verify=False)
    assert torch.get_num_threads() == 1  # left alone
    assert sessions and {s.get_session_options().intra_op_num_threads for s in sessions} == {1}


def test_benchmark_applies_the_knob_records_it_and_flags_a_busy_machine(compiled, tiny_checkpoint, monkeypatch):
    candidate = compiled("sd15", "torch")
    torch.set_num_threads(1)
    monkeypatch.setenv("SDCOMPILER_NUM_THREADS", "3")
    readings = iter([0.25, 64.0])  # start, end
    monkeypatch.setattr(bench, "_load_average", lambda: next(readings))
    kwargs = dict(num_inference_steps=1, height=64, width=64, repeats=1, warmup=0, device="cpu")
    with pytest.warns(NoisyTimingWarning, match="machine busy: load average 64.00 at the end"):
        report = benchmark(candidate, tiny_checkpoint("sd15"), **kwargs)
    assert torch.get_num_threads() == 3
    data = report.to_dict()
    assert data["settings"]["threads"] == 3
    assert data["settings"]["load_average"] == {"start": 0.25, "end": 64.0}
    assert data["noisy"] is True
    assert "warning: machine busy: load average 64.00 at the end" in report.markdown()


def test_bad_thread_knob_is_a_config_error(compiled, monkeypatch):
    from sdcompiler.errors import ConfigError

    monkeypatch.setenv("SDCOMPILER_NUM_THREADS", "two")
    with pytest.raises(ConfigError, match="SDCOMPILER_NUM_THREADS='two' must be a positive integer"):
        load_compiled(compiled("sd15", "torch").root, device="cpu", verify=False)
