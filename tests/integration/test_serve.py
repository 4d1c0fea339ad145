"""`sdcompiler serve`: the real Triton Inference Server from the nvidia-pytriton wheel, on tiny artifacts.

Each server is `python -m sdcompiler serve ARTIFACT` in a subprocess on free ports, started once per module
and artifact (`servers`), waited for until it prints its endpoints and answers /v2/health/ready, and stopped
with SIGTERM at the end; the teardown then checks that neither `serve` nor its tritonserver is left (and
kills them if so, failing the test run). Requests go through tritonclient (HTTP and gRPC).

Oracle: the served images equal `load_compiled(dir)(...)` with the same seed within 1 uint8 level.
Run only these with `pytest -m serving`.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from sdcompiler import load_compiled
from sdcompiler.serving import PIPELINE_INPUTS
from sdcompiler.triton_server import Ports, die_with_parent

pytestmark = [pytest.mark.serving, pytest.mark.slow]
if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip("the nvidia-pytriton wheel's tritonserver runs on x86_64 Linux only", allow_module_level=True)

http = pytest.importorskip("tritonclient.http", reason="pip install 'sd-compiler[serve]' (tritonclient[http])")
grpc = pytest.importorskip("tritonclient.grpc", reason="pip install 'sd-compiler[serve]' (tritonclient[grpc])")

DATATYPES = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32"}
DATATYPES["TYPE_UINT8"] = "UINT8"
NUMPY = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
READY_TIMEOUT = 240


class Served:
    """One `sdcompiler serve` subprocess and clients for it."""

    def __init__(self, artifact, log_path):
        self.artifact, self.ports = artifact, Ports.free()
        self.log = open(log_path, "w+")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sdcompiler",
                "serve",
                str(artifact),
                f"--http-port={self.ports.http}",
                f"--grpc-port={self.ports.grpc}",
                f"--metrics-port={self.ports.metrics}",
                "--max-batch-size=8",
                "--exit-timeout=20",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a killed pytest still stops it (and it stops its tritonserver)
        )
        self.http = http.InferenceServerClient(f"127.0.0.1:{self.ports.http}", concurrency=8)
        self.grpc = grpc.InferenceServerClient(f"127.0.0.1:{self.ports.grpc}")
        self.children: list[psutil.Process] = []

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready; SIGINT" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sdcompiler serve did not become ready:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        self.children = psutil.Process(self.process.pid).children(recursive=True)
        assert any(c.name() == "tritonserver" for c in self.children), self.children
        assert self.http.is_server_live() and self.http.is_server_ready()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Signal `serve`; return its exit status. Whatever is left after `timeout` is killed, and reported."""
        self.http.close()
        self.grpc.close()
        try:
            if self.process.poll() is None:
                self.process.send_signal(sig)
            try:
                status = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                status = None
            _, alive = psutil.wait_procs(self.children, timeout=30)
            for process in alive:
                process.kill()
        finally:
            self.text = self.output()
            self.log.close()
        assert status is not None, f"sdcompiler serve did not stop after its signal:\n{self.text[-2000:]}"
        assert not alive, f"left running after serve stopped: {alive}"
        return status


def inputs(module, **values):
    """tritonclient inputs from pipeline call values; one row per list item (scalars: a one-row request)."""
    types = {t.name: DATATYPES[t.dtype] for t in PIPELINE_INPUTS}
    tensors = []
    for name, value in values.items():
        array = np.asarray(value, dtype=NUMPY[types[name]])
        if name != "image":
            array = array.reshape(-1, 1)
        tensor = module.InferInput(name, list(array.shape), types[name])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def infer(client, module, **values) -> np.ndarray:
    return client.infer("pipeline", inputs(module, **values)).as_numpy("images")


def expected(pipe, prompt, seed, count=1, **arguments) -> np.ndarray:
    """What `load_compiled(dir)(...)` gives for a served row: uint8, image j drawn from seed + j."""
    generators = [torch.Generator().manual_seed(seed + j) for j in range(count)]
    generator = generators[0] if count == 1 else generators
    images = pipe(prompt, generator=generator, num_images_per_prompt=count, output_type="np", **arguments).images
    return (images * 255).round().astype(np.uint8)


def assert_close(served: np.ndarray, reference: np.ndarray) -> None:
    assert served.dtype == np.uint8 and served.shape == reference.shape
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def servers(compiled, tmp_path_factory):
    """target -> (a ready Served for a tiny sd15 artifact of that target, its load_compiled pipeline)."""
    started = {}

    def get(target: str):
        if target not in started:
            artifact = compiled("sd15", target, "none").root
            served = Served(artifact, tmp_path_factory.mktemp("serve") / f"{target}.log")
            started[target] = served, load_compiled(artifact, device="cpu")
            served.wait_ready()
        return started[target]

    yield get
    failures = []
    for target, (served, _) in started.items():
        try:  # every server is stopped, whatever happens to the others
            status = served.stop()
            assert status == 0 and "stopped (tritonserver exit status 0)" in served.text, served.text[-2000:]
        except Exception as exc:
            failures.append(f"{target}: {exc}")
    assert not failures, failures


REQUEST = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=48)


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_served_images_match_load_compiled(servers, target):
    served, pipe = servers(target)
    images = infer(served.http, http, prompt="a red cube", seed=7, negative_prompt="blurry", **REQUEST)
    assert images.shape == (1, 1, 64, 48, 3)
    assert_close(images[0], expected(pipe, "a red cube", 7, negative_prompt="blurry", **REQUEST))

    # two rows in one request (over gRPC), two images each: row i's image j is seed_i + j
    images = served.grpc.infer(
        "pipeline",
        inputs(grpc, prompt=["a red cube", "a blue ball"], seed=[1, 20], num_images=[2, 2], **_rows(REQUEST, 2)),
    ).as_numpy("images")
    assert images.shape == (2, 2, 64, 48, 3)
    assert_close(images[0], expected(pipe, "a red cube", 1, count=2, **REQUEST))
    assert_close(images[1], expected(pipe, "a blue ball", 20, count=2, **REQUEST))


def test_image_to_image_matches_load_compiled(servers):
    served, pipe = servers("onnx")
    picture = np.random.default_rng(0).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    images = infer(served.http, http, prompt="a red cube", image=picture, strength=0.5, seed=3, num_inference_steps=4)
    reference = expected(
        pipe, "a red cube", 3, image=picture.astype(np.float32) / 255.0, strength=0.5, num_inference_steps=4
    )
    assert images.shape == (1, 1, 64, 64, 3)
    assert_close(images[0], reference)


def test_health_readiness_and_metadata(servers):
    served, _ = servers("onnx")
    for client in (served.http, served.grpc):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("pipeline")
    metadata = served.http.get_model_metadata("pipeline")
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [
        (t.name, DATATYPES[t.dtype]) for t in PIPELINE_INPUTS
    ]
    assert metadata["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, -1, 3]}]
    config = served.http.get_model_config("pipeline")
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    assert config["backend"] == "python"
    assert served.grpc.get_model_metadata("pipeline").name == "pipeline"


def _rows(values: dict, rows: int) -> dict:
    return {name: [value] * rows for name, value in values.items()}
