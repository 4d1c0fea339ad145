"""Benchmark: load test of `sdcompiler serve` (the real Triton Inference Server from the nvidia-pytriton wheel).

    python benchmarks/bench_serving.py [--artifact DIR] [--requests 32] [--concurrency 1,2,4,8] [--rate 0]
                                       [--duration 20] [--steps 4] [--size 64] [--out DIR]

Starts `python -m sdcompiler serve ARTIFACT` on free ports (default artifact: a tiny SD1.5 checkpoint compiled
with `--target onnx`, built in a scratch folder), then over gRPC (one client per thread):
1. warm-up: `--warmup` requests, not timed;
2. closed loop at each `--concurrency` level: that many clients send `--requests` requests in all, each client
   its next one as soon as the last one is answered;
3. open loop: requests arrive as a Poisson process at `--rate` per second for `--duration` seconds, each sent
   from its own thread whatever the server is doing (0: 70 % of the best closed-loop throughput).
Per phase: p50 / p95 / p99 latency (client side, send to answer), throughput, failed requests (must be 0: the
script exits 1 otherwise), and the server's batching from its metrics endpoint: requests per pipeline execution
(`nv_inference_count / nv_inference_exec_count`, deltas over the phase). Every request asks for one image of
`--size` x `--size` with `--steps` steps, a different seed each, so dynamic batching may merge any of them.
Writes serving_<arch>_<target>.{json,md} to `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import finish_results, log, new_results, write_results  # noqa: E402

PACKAGES = ("sd-compiler", "nvidia-pytriton", "tritonclient", "onnxruntime", "torch", "numpy")


def build_artifact(root: Path, target: str) -> Path:
    from sdcompiler import compile_pipeline
    from sdcompiler.testing import make_checkpoint

    checkpoint = make_checkpoint(root / "checkpoint", "sd15", "tiny", seed=0)
    compile_pipeline(checkpoint, recipe="none", target=target, output_dir=root / "artifact", device="cpu")
    return root / "artifact"


def start_server(artifact: Path, log_path: Path, max_batch_size: int, instances: int):
    from sdcompiler.triton_server import Ports, die_with_parent

    ports = Ports.free()
    out = open(log_path, "w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdcompiler",
            "serve",
            str(artifact),
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
            f"--max-batch-size={max_batch_size}",
            f"--instances={instances}",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + 300
    while "ready; SIGINT" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"sdcompiler serve did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return process, ports, out


def counters(ports) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_") and 'model="pipeline"' in line:
            found[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return found


class Load:
    """Sends requests over gRPC; records (latency seconds, ok) per request."""

    def __init__(self, ports, steps: int, size: int):
        self.address, self.steps, self.size = f"127.0.0.1:{ports.grpc}", steps, size
        self.lock = threading.Lock()
        self.seed = 0

    def client(self):
        import tritonclient.grpc as grpc

        return grpc.InferenceServerClient(self.address)

    def request(self, client) -> tuple[float, bool, str]:
        import numpy as np
        import tritonclient.grpc as grpc

        with self.lock:
            self.seed += 1
            seed = self.seed
        values = {
            "prompt": (np.array([[b"a red cube on a wooden table"]], dtype=object), "BYTES"),
            "num_inference_steps": (np.array([[self.steps]], np.int32), "INT32"),
            "height": (np.array([[self.size]], np.int32), "INT32"),
            "width": (np.array([[self.size]], np.int32), "INT32"),
            "seed": (np.array([[seed]], np.int64), "INT64"),
        }
        inputs = []
        for name, (array, datatype) in values.items():
            tensor = grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        start = time.perf_counter()
        try:
            images = client.infer("pipeline", inputs, client_timeout=300).as_numpy("images")
            ok, error = images.shape == (1, 1, self.size, self.size, 3), ""
        except Exception as exc:  # counted as a failure, reported with its message
            ok, error = False, str(exc)[:200]
        return time.perf_counter() - start, ok, error


def closed_loop(load: Load, concurrency: int, total: int) -> tuple[list, float]:
    results, counter = [], iter(range(total))
    lock = threading.Lock()

    def worker():
        client = load.client()
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            result = load.request(client)
            with lock:
                results.append(result)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def open_loop(load: Load, rate: float, duration: float, seed: int = 0) -> tuple[list, float]:
    rng, results, threads = random.Random(seed), [], []
    lock = threading.Lock()

    def one():
        client = load.client()
        result = load.request(client)
        client.close()
        with lock:
            results.append(result)

    start = time.perf_counter()
    next_at = start
    while next_at - start < duration:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
        next_at += rng.expovariate(rate)
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def summarize(name: str, results: list, seconds: float, before: dict, after: dict, **extra) -> dict:
    latencies = sorted(r[0] for r in results if r[1])
    failures = [r[2] for r in results if not r[1]]

    def percentile(q: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))], 1)

    executions = after.get("nv_inference_exec_count", 0) - before.get("nv_inference_exec_count", 0)
    rows = after.get("nv_inference_count", 0) - before.get("nv_inference_count", 0)
    return {
        "phase": name,
        **extra,
        "requests": len(results),
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99),
        "server_executions": int(executions),
        "requests_per_execution": round(rows / executions, 2) if executions else None,
    }


def table(results: dict) -> str:
    lines = [
        f"### Serving load test: {results['artifact_kind']} ({results['request']})",
        "",
        f"Machine: {results['machine']['cpu_model']}, {results['machine']['cpu_count']} cores; "
        f"{results['date']}; load average {results['load_average']['start']} -> {results['load_average']['end']}.",
        "",
        "| phase | requests | failed | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | requests per execution |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["phases"]:
        lines.append(
            f"| {p['phase']} | {p['requests']} | {p['failed']} | {p['throughput_rps']} | {p['p50_ms']} | "
            f"{p['p95_ms']} | {p['p99_ms']} | {p['requests_per_execution']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="default: a tiny SD1.5 artifact compiled here")
    parser.add_argument("--target", default="onnx", choices=["onnx", "torch"], help="of the default artifact")
    parser.add_argument("--requests", type=int, default=32, help="per closed-loop level")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--rate", type=float, default=0.0, help="open-loop requests/s (0: 70%% of the best)")
    parser.add_argument("--duration", type=float, default=20.0, help="open-loop seconds")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    process = out = None
    try:
        artifact = args.artifact or build_artifact(scratch, args.target)
        from sdcompiler.artifact import read_manifest

        manifest = read_manifest(artifact)
        kind = f"{manifest['arch']} {'tiny ' if args.artifact is None else ''}{manifest['target']} artifact"
        results = new_results(
            "serving",
            PACKAGES,
            artifact_kind=kind,
            request=f"1 image of {args.size}x{args.size}, {args.steps} steps, CFG on",
            settings={
                "max_batch_size": args.max_batch_size,
                "instances": args.instances,
                "requests_per_level": args.requests,
                "warmup": args.warmup,
                "client": "tritonclient.grpc, one client per thread",
            },
        )
        log(f"starting sdcompiler serve {artifact}")
        process, ports, out = start_server(artifact, scratch / "serve.log", args.max_batch_size, args.instances)
        load = Load(ports, args.steps, args.size)
        client = load.client()
        for _ in range(args.warmup):
            load.request(client)
        client.close()
        phases = []
        for level in [int(c) for c in args.concurrency.split(",")]:
            log(f"closed loop, concurrency {level}")
            before = counters(ports)
            done, seconds = closed_loop(load, level, args.requests)
            phases.append(summarize(f"closed loop, {level} clients", done, seconds, before, counters(ports)))
        best = max(p["throughput_rps"] for p in phases)
        rate = args.rate or round(0.7 * best, 2)
        log(f"open loop, {rate} requests/s for {args.duration} s")
        before = counters(ports)
        done, seconds = open_loop(load, rate, args.duration)
        phases.append(summarize(f"open loop, {rate} req/s (Poisson)", done, seconds, before, counters(ports)))
        results["phases"] = phases
        finish_results(results)
        name = f"serving_{manifest['arch']}_{manifest['target']}"
        write_results(results, table(results), args.out, name)
        failed = sum(p["failed"] for p in phases)
        if failed:
            log(f"{failed} request(s) failed: {[p['failures'] for p in phases if p['failed']]}")
        return 1 if failed else 0
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
            out.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
