"""`sdcompiler serve`: the real Triton Inference Server from the nvidia-pytriton wheel, on tiny artifacts.

Each server is `python -m sdcompiler serve ARTIFACT` in a subprocess on free ports, started once per module
and artifact (`servers`), waited for until it prints its endpoints and answers /v2/health/ready, and stopped
with SIGTERM at the end; the teardown then checks that neither `serve` nor its tritonserver is left (and
kills them if so, failing the test run). Requests go through tritonclient (HTTP and gRPC).

Oracle: the served images equal `load_compiled(dir)(...)` with the same seed within 1 uint8 level.
Run only these with `pytest -m serving`.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request

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
from tritonclient.utils import InferenceServerException  # noqa: E402

from sdcompiler.errors import PipelineArgumentError  # noqa: E402

DATATYPES = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FP32"}
DATATYPES["TYPE_UINT8"] = "UINT8"
NUMPY = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
READY_TIMEOUT = 240


class Served:
    """One `sdcompiler serve` subprocess and clients for it."""

    def __init__(self, artifact, log_path, *options: str):
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
                "--exit-timeout=60",  # generous: a loaded 2-core CI machine unloads slowly
                *options,
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

    def close_clients(self) -> None:
        """Close the fixture's connections: Triton 2.51 waits for open HTTP connections at shutdown (until its
        exit timeout, then exits with status 1)."""
        self.http.close()
        self.grpc.close()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Signal `serve`; return its exit status. Whatever is left after `timeout` is killed, and reported."""
        self.close_clients()
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


def metrics(served) -> dict[str, float]:
    """The pipeline model's counters from the metrics endpoint: {"nv_inference_request_success": 32.0, ...}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports.metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counters = {}
    for line in text.splitlines():
        if line.startswith("nv_") and 'model="pipeline"' in line:
            counters[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return counters


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
def lora_dir(tiny_checkpoint, tmp_path_factory):
    """The torch server's LoRA folder: `style.safetensors`, a random LoRA for tiny sd15 (U-Net and text encoder)."""
    from lora_files import make_full_lora

    folder = tmp_path_factory.mktemp("served-loras")
    made = make_full_lora(tiny_checkpoint("sd15"), tmp_path_factory.mktemp("lora"), seed=5)
    made.rename(folder / "style.safetensors")
    return folder


@pytest.fixture(scope="module")
def servers(compiled, tmp_path_factory, lora_dir):
    """target -> (a ready Served for a tiny sd15 artifact of that target, its load_compiled pipeline); the torch
    server offers the LoRAs of `lora_dir`."""
    started = {}

    def get(target: str):
        if target in started and started[target][0].process.poll() is not None:  # a test stopped it
            started.pop(target)[0].stop()
        if target not in started:
            artifact = compiled("sd15", target, "none").root
            options = [f"--lora-dir={lora_dir}"] if target == "torch" else []
            served = Served(artifact, tmp_path_factory.mktemp("serve") / f"{target}.log", *options)
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


def test_rows_run_with_the_loras_they_name(servers, lora_dir):
    served, pipe = servers("torch")
    request = dict(REQUEST, num_inference_steps=2)
    # one request, three rows: the LoRA at 0.7, none, the LoRA at 1 (grouped by LoRA set, switched between groups)
    images = served.http.infer(
        "pipeline",
        inputs(http, prompt=["a red cube"] * 3, seed=[4, 4, 4], loras=["style:0.7", "", "style"], **_rows(request, 3)),
    ).as_numpy("images")
    plain = expected(pipe, "a red cube", 4, **request)
    for row, scale in ((0, 0.7), (2, 1.0)):
        pipe.set_loras([(str(lora_dir / "style.safetensors"), scale)])
        try:
            assert_close(images[row], expected(pipe, "a red cube", 4, **request))
        finally:
            pipe.set_loras([])
        assert np.abs(images[row].astype(int) - plain.astype(int)).max() > 8  # the LoRA changes the image
    assert_close(images[1], plain)
    with pytest.raises(InferenceServerException, match="'nope' is not in the server's LoRA folder .offered: style."):
        infer(served.http, http, prompt="a red cube", loras="nope:0.5", **request)


def test_image_to_image_matches_load_compiled(servers):
    served, pipe = servers("onnx")
    picture = np.random.default_rng(0).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    images = infer(served.http, http, prompt="a red cube", image=picture, strength=0.5, seed=3, num_inference_steps=4)
    reference = expected(
        pipe, "a red cube", 3, image=picture.astype(np.float32) / 255.0, strength=0.5, num_inference_steps=4
    )
    assert images.shape == (1, 1, 64, 64, 3)
    assert_close(images[0], reference)


def test_base_and_refiner_are_served_as_one_model(compiled, tmp_path):
    """`sdcompiler serve BASE --refiner DIR`: a request runs the SDXL base to its denoising_end, then the refiner
    with its aesthetic score, as `load_compiled(base, refiner=DIR)` does with the same seed."""
    base, refiner = compiled("sdxl", "torch").root, compiled("sdxl-refiner", "torch").root
    served = Served(base, tmp_path / "refiner.log", f"--refiner={refiner}")
    try:
        served.wait_ready()
        assert f"with the refiner {refiner.resolve()}" in served.output()
        request = dict(num_inference_steps=4, height=64, width=64, denoising_end=0.5, aesthetic_score=3.0)
        images = infer(served.http, http, prompt="a cat", seed=2, **request)
    finally:
        status = served.stop()
    assert status == 0
    assert images.shape == (1, 1, 64, 64, 3)
    assert_close(images[0], expected(load_compiled(base, device="cpu", refiner=refiner), "a cat", 2, **request))


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


PICTURE = np.random.default_rng(1).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)

# name -> (the served request's inputs, its request parameters, the Python API call that is refused alike)
BAD_REQUESTS = {
    "missing prompt": (dict(seed=1), {}, dict(prompt=None)),
    "steps 0": (dict(prompt="x", num_inference_steps=0), {}, dict(prompt="x", num_inference_steps=0)),
    "height not a multiple of 8": (dict(prompt="x", height=60), {}, dict(prompt="x", height=60)),
    "guidance NaN": (dict(prompt="x", guidance_scale=math.nan), {}, dict(prompt="x", guidance_scale=math.nan)),
    "guidance negative": (dict(prompt="x", guidance_scale=-2.0), {}, dict(prompt="x", guidance_scale=-2.0)),
    "strength above 1": (
        dict(prompt="x", image=PICTURE, strength=1.5),
        {},
        dict(prompt="x", image=PICTURE / 255.0, strength=1.5),
    ),
    "strength without image": (dict(prompt="x", strength=0.5), {}, dict(prompt="x", strength=0.5)),
    "too many images": (dict(prompt="x", num_images=65), {}, dict(prompt="x", num_images_per_prompt=65)),
    "no images": (dict(prompt="x", num_images=0), {}, dict(prompt="x", num_images_per_prompt=0)),
    "oversized height": (dict(prompt="x", height=8192), {}, dict(prompt="x", height=8192)),
    "unknown parameter": (dict(prompt="x"), {"guidance_rescale": 0.5}, dict(prompt="x", guidance_rescale=0.5)),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_the_python_api_message_and_the_server_keeps_serving(servers, protocol):
    served, pipe = servers("onnx")
    client, module = (served.http, http) if protocol == "http" else (served.grpc, grpc)
    for name, (values, parameters, call) in BAD_REQUESTS.items():
        with pytest.raises(PipelineArgumentError) as python_api:
            pipe(**{"num_inference_steps": 2, **call}, output_type="np")
        with pytest.raises(InferenceServerException) as refused:
            client.infer("pipeline", inputs(module, **values), parameters=parameters or None)
        assert refused.value.message() == str(python_api.value), name

    # what Triton itself refuses before the model runs (no Python API counterpart): its own one-line messages
    wrong_dtype = module.InferInput("num_inference_steps", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.array([[2.5]], np.float32))
    wrong_shape = module.InferInput("prompt", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    unknown = module.InferInput("eta", [1, 1], "FP32")
    unknown.set_data_from_numpy(np.array([[0.5]], np.float32))
    not_utf8 = module.InferInput("prompt", [1, 1], "BYTES")
    not_utf8.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    refusals = {
        "wrong dtype": ([wrong_dtype, *inputs(module, prompt="x")], ("num_inference_steps", "FP32", "INT32")),
        "wrong shape": ([wrong_shape], ("prompt", "shape")),
        "unknown input": ([unknown, *inputs(module, prompt="x")], ("eta",)),
        "too many rows": (inputs(module, prompt=["x"] * 9), ("batch-size must be <= 8",)),
        "prompt not UTF-8": ([not_utf8], ("prompt of row 0 is not UTF-8 text",)),
    }
    for name, (tensors, words) in refusals.items():
        with pytest.raises(InferenceServerException) as refused:
            client.infer("pipeline", tensors)
        message = refused.value.message()
        assert all(word in message for word in words) and "\n" not in message, (name, message)

    assert client.is_server_ready() and client.is_model_ready("pipeline")
    images = infer(client, module, prompt="a red cube", seed=4, **REQUEST)
    assert_close(images[0], expected(pipe, "a red cube", 4, **REQUEST))


def test_concurrent_clients_are_batched_and_each_gets_its_own_images(servers):
    """8 clients x 4 requests (alternately over HTTP and gRPC) while a 9th sends bad requests: every good
    request gets the images it gets alone, the bad ones fail alone, and the metrics show fewer pipeline
    executions than requests (dynamic batching merged some)."""
    served, pipe = servers("onnx")
    before = metrics(served)
    clients, per_client = 8, 4
    answers, failures = {}, []

    def client_thread(n: int) -> None:
        module = http if n % 2 == 0 else grpc
        address = served.ports.http if module is http else served.ports.grpc
        client = module.InferenceServerClient(f"127.0.0.1:{address}")
        try:
            for k in range(per_client):
                seed = 100 * n + k
                answers[seed] = infer(client, module, prompt=f"prompt {n}", seed=seed, **REQUEST)
        except Exception as exc:
            failures.append(exc)
        finally:
            client.close()

    def bad_thread() -> None:
        client = grpc.InferenceServerClient(f"127.0.0.1:{served.ports.grpc}")
        for k in range(per_client):
            try:
                infer(client, grpc, prompt="x", seed=k, **{**REQUEST, "height": 60})
                failures.append("a bad request was served")
            except InferenceServerException as exc:
                if exc.message() != "height=60 must be a positive multiple of 8":
                    failures.append(exc.message())
        client.close()

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=bad_thread))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads) and not failures, failures
    assert len(answers) == clients * per_client
    for seed, images in answers.items():
        assert_close(images[0], expected(pipe, f"prompt {seed // 100}", seed, **REQUEST))

    # Triton 2.51's Python backend counts a request answered with an error response as a success too
    after = metrics(served)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    requests = clients * per_client + per_client
    assert delta["nv_inference_request_success"] + delta["nv_inference_request_failure"] == requests
    assert delta["nv_inference_count"] == requests  # one row per request
    assert delta["nv_inference_exec_count"] < requests, delta  # some executions served two or more requests


def test_shutdown_lets_the_request_in_flight_finish(servers):
    served, _ = servers("torch")  # ~4 s for 100 steps on a 2-core CPU: still running at the signal
    result = {}

    def long_request() -> None:
        client = grpc.InferenceServerClient(f"127.0.0.1:{served.ports.grpc}")
        try:
            result["images"] = infer(client, grpc, prompt="a red cube", num_inference_steps=100, height=64, width=64)
        except Exception as exc:
            result["error"] = exc
        client.close()

    thread = threading.Thread(target=long_request)
    served.close_clients()
    thread.start()
    time.sleep(1.5)  # the request is running
    served.process.send_signal(signal.SIGINT)
    time.sleep(1.0)
    # a request sent after the signal ends at once too: Triton 2.51 refuses it (the model is unloading)
    late = grpc.InferenceServerClient(f"127.0.0.1:{served.ports.grpc}")
    started = time.monotonic()
    try:
        images = late.infer("pipeline", inputs(grpc, prompt="late", **REQUEST), client_timeout=30).as_numpy("images")
        assert images.shape == (1, 1, 64, 48, 3)
    except InferenceServerException as exc:
        assert "Deadline" not in str(exc), exc  # an error, not the client's timeout
    assert time.monotonic() - started < 30
    late.close()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request in flight hung"
    assert "error" not in result, result.get("error")
    assert result["images"].shape == (1, 1, 64, 64, 3) and result["images"].std() > 0
    assert served.process.wait(60) == 0
    text = served.output()
    assert "stopping: requests in flight finish first" in text and "stopped (tritonserver exit status 0)" in text
