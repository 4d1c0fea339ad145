"""The Triton Inference Server inside the `nvidia-pytriton` wheel: find it, start it on a model repository,
wait until it is ready, stop it; and `serve`, which does all of that for an artifact.

    serve("out/", http_port=8000)           # blocks until SIGINT / SIGTERM; `sdcompiler serve out/`
    serve("base/", refiner="refiner/")      # SDXL base + refiner as one model; `sdcompiler serve base/ --refiner DIR`

    with TritonServer(repo, Ports.free()) as server:   # started and ready; stopped on leaving
        server.endpoints["http"]

The wheel (`pip install --no-deps nvidia-pytriton==0.7.0`: its numpy<2 pin is for pytriton's own Python
API, which is not used here) holds `pytriton/tritonserver/bin/tritonserver` (Triton 2.51), the Python backend,
one backend stub per Python version and the shared libraries they link (`nvidia_pytriton.libs/`). It has no
ONNX Runtime or TensorRT backend, so it serves the repository layout "pipeline" (`serving.export_server`):
one Python-backend model that runs `load_compiled`. The backend directory is made per server in a scratch
folder: `python/` with links to the wheel's backend library and utilities and to the stub of the running
Python's version (the backend looks for its stub there).

Shutdown: SIGTERM to tritonserver stops new inference, lets the requests in flight finish (up to
`exit_timeout` seconds; after it they fail), unloads the models and exits; `stop` sends SIGKILL only when
that does not happen in time. tritonserver is started with a parent-death signal, so it never outlives the
Python process that started it, even one killed with SIGKILL.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sdcompiler import knobs
from sdcompiler.errors import SDCompilerError

WHEEL = "nvidia-pytriton==0.7.0"
INSTALL = f"pip install --no-deps {WHEEL} (make install does it)"
LOG_LEVELS = ("error", "warning", "info", "verbose")
_LOG_FLAGS = {
    "error": ["--log-info=false", "--log-warning=false"],
    "warning": ["--log-info=false"],
    "info": [],
    "verbose": ["--log-verbose=1"],
}
# what tritonserver prints on a machine without an NVIDIA GPU or driver; nothing is wrong
_NO_GPU_NOISE = (
    "Failed to initialize NVML",
    "DCGM",
    "CUDA driver",
    "CudaDriverHelper",
    "cudaGetDeviceCount",
    "Unable to get CUDA",
)


class ServingError(SDCompilerError):
    """The bundled Triton Inference Server is missing, did not start, or did not stop."""


@dataclass(frozen=True)
class BundledServer:
    """Paths of the server inside the nvidia-pytriton wheel."""

    binary: Path
    libraries: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls) -> "BundledServer":
        """The installed wheel's server, for the running Python's version; ServingError naming the fix if not."""
        spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (or its deps)
        if spec is None or not spec.submodule_search_locations:
            raise ServingError(f"the bundled Triton Inference Server is not installed: {INSTALL}")
        package = Path(list(spec.submodule_search_locations)[0])
        server = package / "tritonserver"
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            binary=server / "bin" / "tritonserver",
            libraries=package.parent / "nvidia_pytriton.libs",
            python_backend=server / "backends" / "python",
            stub=server / "python_backend_stubs" / python / "triton_python_backend_stub",
        )
        for path in (found.binary, found.libraries, found.python_backend / "libtriton_python.so", found.stub):
            if not path.exists():
                raise ServingError(
                    f"{path} is missing from the installed nvidia-pytriton (Python {python} needs its stub); "
                    f"reinstall it: {INSTALL}"
                )
        stub_site = knobs.triton_stub_site()
        if not (stub_site / "numpy").is_dir():
            raise ServingError(
                f"no numpy 1.26 for the Triton Python backend stub at {stub_site} (the stub garbles tensors "
                f"under numpy 2): pip install --no-deps --target {stub_site} numpy==1.26.4 (make install does it)"
            )
        return found

    def backend_directory(self, folder: Path) -> Path:
        """`folder/python/`: links to the wheel's Python backend and the stub for this Python; returns folder."""
        python = folder / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in (*self.python_backend.iterdir(), self.stub):
            if source.is_file():
                (python / source.name).symlink_to(source)
        return folder


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        """Three ports the OS reports free now (another process may still take one before the server binds)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


class TritonServer:
    """A tritonserver process on a model repository: `start`, `wait_ready`, `stop` (a context manager does all
    three). Its log goes to `log` (default stderr) without the no-GPU noise; the last lines are kept for errors.
    """

    def __init__(
        self,
        repository: str | Path,
        ports: Ports = Ports(),
        *,
        log_level: str = "warning",
        exit_timeout: int = 30,
        host: str = "127.0.0.1",
        log=None,
    ):
        if log_level not in LOG_LEVELS:
            raise ServingError(f"log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        self.repository, self.ports, self.log_level = Path(repository), ports, log_level
        self.exit_timeout, self.host, self.log = exit_timeout, host, log
        self.process: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._scratch: Path | None = None
        self._relay: threading.Thread | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "http": f"http://{self.host}:{self.ports.http}",
            "grpc": f"{self.host}:{self.ports.grpc}",
            "metrics": f"http://{self.host}:{self.ports.metrics}/metrics",
        }

    def command(self, bundled: BundledServer, backends: Path) -> list[str]:
        return [
            str(bundled.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            *_LOG_FLAGS[self.log_level],
        ]

    def start(self) -> "TritonServer":
        bundled = BundledServer.find()
        self._scratch = Path(tempfile.mkdtemp(prefix="sdcompiler-triton-"))
        backends = bundled.backend_directory(self._scratch / "backends")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(bundled.libraries), env.get("LD_LIBRARY_PATH")]))
        self.process = subprocess.Popen(
            self.command(bundled, backends),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches `serve`, which stops the server in order
            preexec_fn=die_with_parent,
        )
        self._relay = threading.Thread(target=self._relay_log, daemon=True)
        self._relay.start()
        return self

    def _relay_log(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line or any(noise in line for noise in _NO_GPU_NOISE):
                continue
            self.tail.append(line)
            stream = self.log or sys.stderr
            print(line, file=stream, flush=True)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints['http']}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0, cancel: threading.Event | None = None) -> bool:
        """Wait until the server and its models are ready (True), or `cancel` is set (False); ServingError,
        with the log's last error line, when the process exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if cancel is not None and cancel.is_set():
                return False
            if self.process.poll() is not None:
                raise ServingError(
                    f"tritonserver exited with status {self.process.returncode} before it was ready; "
                    f"its last log line: {self._last_error()}"
                )
            if time.monotonic() > deadline:
                raise ServingError(
                    f"tritonserver was not ready after {timeout:.0f} s; its last log line: {self._last_error()}"
                )
            time.sleep(0.2)
        return True

    def _last_error(self) -> str:
        if self._relay is not None:
            self._relay.join(timeout=1)
        errors = [line for line in self.tail if line[:1] == "E" or "error" in line.lower()]
        return (errors or list(self.tail) or ["(none)"])[-1][:300]

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then wait for the in-flight requests and the model unload (`exit_timeout` + 15 s unless
        `timeout`), SIGKILL after that; removes the scratch folder. Returns the exit status."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.exit_timeout + 15 if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._relay is not None:
                self._relay.join(timeout=5)
            return None if process is None else process.returncode
        finally:
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the context manager and `serve` still stop it
        pass


def serve(
    artifact: str | Path,
    *,
    ports: Ports = Ports(),
    host: str = "127.0.0.1",
    instances: int = 1,
    max_batch_size: int = 8,
    log_level: str = "warning",
    device: str | None = None,
    lora_dir: str | Path | None = None,
    refiner: str | Path | None = None,
    verify: bool = True,
    ready_timeout: float = 300.0,
    exit_timeout: int = 30,
    out=None,
) -> int:
    """Serve an artifact with the bundled server until SIGINT or SIGTERM; returns tritonserver's exit status.

    The model repository (layout "pipeline", the artifact hard-linked into it) is made in a scratch folder
    and removed at the end. Prints the endpoints to `out` (default stdout) once the server is ready. `lora_dir`:
    a folder of NAME.safetensors LoRAs that requests name in their `loras` input (`serving.LoraFolder`).
    `refiner`: an SDXL refiner artifact run after the SDXL base `artifact` on every row (both hard-linked into the
    repository; requests take `denoising_end`, `aesthetic_score`, `negative_aesthetic_score`).
    """
    from sdcompiler.artifact import read_manifest
    from sdcompiler.serving import PIPELINE, export_server

    out = out or sys.stdout
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    scratch = Path(tempfile.mkdtemp(prefix="sdcompiler-serve-"))
    try:
        manifest = read_manifest(Path(artifact))
        repo = export_server(
            artifact,
            scratch / "repository",
            layout="pipeline",
            max_batch_size=max_batch_size,
            instance_count=instances,
            device=device,
            lora_dir=lora_dir,
            refiner=refiner,
            verify=verify,
        )
        server = TritonServer(repo, ports, host=host, log_level=log_level, exit_timeout=exit_timeout)
        server.start()
        try:
            if server.wait_ready(ready_timeout, cancel=stop):
                refined = "" if refiner is None else f" with the refiner {Path(refiner).resolve()}"
                print(
                    f"serving {Path(artifact).resolve()} ({manifest['arch']}, target {manifest['target']}){refined} "
                    f"as model '{PIPELINE}'",
                    file=out,
                )
                for name, url in server.endpoints.items():
                    print(f"  {name:<8} {url}", file=out)
                print(f"  infer    {server.endpoints['http']}/v2/models/{PIPELINE}/infer", file=out)
                print("ready; SIGINT (Ctrl-C) or SIGTERM stops it", file=out, flush=True)
            while not stop.is_set() and server.process.poll() is None:
                stop.wait(0.5)
            if not stop.is_set():
                raise ServingError(
                    f"tritonserver exited by itself with status {server.process.returncode}; last log line: "
                    f"{server._last_error()}"
                )
            print("stopping: requests in flight finish first", file=out, flush=True)
        finally:
            status = server.stop()
        print(f"stopped (tritonserver exit status {status})", file=out, flush=True)
        if status and any("Exit timeout expired" in line for line in server.tail):
            print(
                f"tritonserver waited the whole --exit-timeout ({exit_timeout} s): clients kept connections or "
                "requests open until then (Triton 2.51 waits for open HTTP connections too)",
                file=out,
                flush=True,
            )
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(scratch, ignore_errors=True)
