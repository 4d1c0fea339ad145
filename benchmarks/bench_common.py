"""Helpers the benchmark scripts share: logging, machine description, load and CPU-use sampling, peak RSS, and
the results header and closing (other busy processes, load average, `results/<name>.{json,md}`).

A plain module next to the scripts: `python benchmarks/bench_x.py` puts this folder on sys.path, and each script
also inserts it itself, so `from bench_common import ...` works from any working directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- machine ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes with a high lifetime-average %CPU (ps): names the likely culprits, measures nothing."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,ppid,ni,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    busy = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) < 5 or os.getpid() in (int(parts[0]), int(parts[1])):
            continue
        if float(parts[3]) >= min_cpu:
            niced = f" (nice {parts[2]})" if parts[2] not in ("0", "-") else ""
            busy.append(f"pid {parts[0]}{niced}: {parts[4][:100]}")
    return busy[:5]


class CpuMeter:
    """CPU used by other processes during a phase: all busy CPU time (/proc/stat) minus this process and its
    children (getrusage). `others_cores` = average cores the rest of the machine kept busy (0 = quiet)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
        ours = sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), ours

    def stop(self) -> dict:
        end = self._sample()
        if self.start is None or end is None:
            return {}
        wall, busy, ours = (e - s for e, s in zip(end, self.start))
        others = max(0.0, busy - ours)
        return {"wall_s": round(wall, 1), "our_cores": round(ours / wall, 2), "others_cores": round(others / wall, 2)}


def machine() -> dict:
    return {
        "cpu_model": cpu_model(),
        "platform_processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `packages`; those not installed are left out."""
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_gib() -> float:
    """Peak RSS of this process so far, GiB (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)


# --- results ------------------------------------------------------------------------------------------------------


def new_results(name: str, packages: tuple[str, ...], **extra) -> dict:
    """The results' opening keys, in order: benchmark, date, machine, versions, `extra`, load average at start,
    other busy processes. The caller adds its settings and measurements after these."""
    return {
        "benchmark": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(packages),
        **extra,
        "load_average": {"start": load_average()},
        "other_busy_processes": busy_processes(),
    }


def finish_results(results: dict) -> None:
    """Record the load average at the end and add the processes busy now to those busy at the start."""
    results["load_average"]["end"] = load_average()
    for busy in busy_processes():
        if busy not in results["other_busy_processes"]:
            results["other_busy_processes"].append(busy)


def write_results(results: dict, table: str, results_dir: Path, name: str) -> Path:
    """Write `<results_dir>/<name>.json` and `.md`, print the Markdown table; return the JSON's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text(table)
    print(table)
    return results_dir / f"{name}.json"


def import_checkout(with_passes: bool = False) -> None:
    """Make `sdcompiler` (with `.kernels`, and `.passes` if asked) importable from this checkout when it is not
    installed (the lent GPU machine has no registry access). The kernel modules need only torch and Triton;
    the passes need diffusers too (run_gpu_checks.sh installs the carried wheel)."""
    try:
        import sdcompiler.kernels  # noqa: F401

        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    packages = [("sdcompiler", "compiler"), ("sdcompiler.kernels", "kernels")]
    packages += [("sdcompiler.passes", "passes")] if with_passes else []
    modules = {}
    for name, folder in packages:  # register all before running any: they import each other
        spec = importlib.util.spec_from_file_location(
            name, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        modules[name] = (importlib.util.module_from_spec(spec), spec)
        sys.modules[name] = modules[name][0]
    for name, (module, spec) in modules.items():
        spec.loader.exec_module(module)
        if "." in name:
            setattr(sys.modules["sdcompiler"], name.split(".", 1)[1], module)


def median_ms(fn, warmup: int, repeats: int, device: str = "cuda") -> float:
    """Median milliseconds of one `fn()` over `repeats` calls after `warmup` calls: CUDA events around each call
    on "cuda" (launch overhead included), the wall clock elsewhere. torch is imported on first use."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graph_ms(fn, warmup: int, repeats: int, calls: int = 20, side_calls: int = 1) -> float:
    """Per-call GPU time: the median replay time of a CUDA graph holding `calls` calls of `fn`, divided by
    `calls` (a call's kernels can run for about what launching them from Python costs: replays measure the GPU
    work). `side_calls` warm-up calls run on a side stream before the capture, as torch.cuda.graphs asks."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        for _ in range(side_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, warmup, repeats) / calls
