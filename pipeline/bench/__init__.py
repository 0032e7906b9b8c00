"""Benchmarks of the pipeline against its peers and its limits (not part of the test suite).

`python -m pipeline.bench <name> [--json OUT] [--repeats N] [--quick]` (or `pipeline bench ...`)
runs one benchmark, prints a table and writes its JSON under `bench-results/`. Contenders are
interleaved in one process (A, B, A, B, ...) and reported as medians, so their ratio is not
skewed by the machine's load drifting between them; the load average is recorded alongside.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: benchmark name -> module under `pipeline.bench` exposing `run(opts) -> Report`
BENCHMARKS: dict[str, str] = {
    "data": "pipeline.bench.data",
    "overhead": "pipeline.bench.overhead",
    "step": "pipeline.bench.step",
    "sampling": "pipeline.bench.sampling",
    "gpu": "pipeline.bench.gpu_entry",
    "e2e": "pipeline.bench.e2e",
    "ksparse-filters": "pipeline.bench.ksparse_filters",
    "generation": "pipeline.bench.generation",
    "cascade": "pipeline.bench.cascade",
}

RESULTS_DIR = Path("bench-results")


@dataclass
class Options:
    """Command-line options every benchmark understands."""

    repeats: int | None = None  # None: the benchmark's own default
    quick: bool = False  # seconds-long smoke mode (tiny sizes, 1-2 repeats)
    extra: list[str] = field(default_factory=list)  # benchmark-specific arguments


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (other jobs share this machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), **code_version()}


def code_version() -> dict[str, Any]:
    """The commit measured and the files under pipeline/ that differed from it (a shared working tree)."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "pipeline", "jobs"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted": []}
    return {"commit": commit or None, "uncommitted": [line[3:] for line in dirty if line.strip()]}


def median(xs: list[float]) -> float:
    """Median (NaN for an empty list)."""
    return float(statistics.median(xs)) if xs else float("nan")


def interleave(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[Any]]:
    """Call each contender in turn (A, B, A, B, ...), `warmup` untimed rounds first.

    Each callable returns what it measured (seconds, a rate, or a `Clock` reading); the lists of
    measurements are returned per contender. The order alternates each round (A, B then B, A)
    so neither contender always runs on a warmer cache.
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(contenders[n]())
    return out


@dataclass
class Clock:
    """Wall and CPU seconds of one measurement.

    On a shared machine (load averages far above the core count) wall time mostly measures how much
    CPU the scheduler granted; the calling thread's CPU time measures the work. With one torch
    thread all compute runs in the calling thread, so `cpu` is the load-independent cost.
    """

    wall: float
    cpu: float


class clock:
    """`with clock() as c: ...` then `c.result` is a `Clock` of the block."""

    def __enter__(self) -> clock:
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = Clock(time.perf_counter() - self._w, time.thread_time() - self._c)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Report:
    """One benchmark's outcome: a table, headline ratios and the conditions they were measured in."""

    name: str
    command: str
    columns: list[str]
    rows: list[dict[str, Any]]
    ratios: dict[str, float] = field(default_factory=dict)  # headline ratios, stated plainly
    goals: dict[str, str] = field(default_factory=dict)  # ratio name -> goal, e.g. "< 0.10"
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine)
    date: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    seconds: float = 0.0

    def table(self) -> str:
        """The rows as a Markdown table."""
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                if v != v:
                    return "n/a"
                a = abs(v)
                if a >= 100:
                    return f"{v:,.0f}"
                if a >= 1:
                    return f"{v:.2f}"
                return f"{v:.4g}"
            return str(v)

        def cell(text: str) -> str:
            return text.replace("|", "\\|")  # a literal pipe inside a Markdown table cell

        lines = ["| " + " | ".join(cell(c) for c in self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(cell(fmt(row.get(c, ""))) for c in self.columns) + " |")
        return "\n".join(lines)

    def text(self) -> str:
        """Table, ratios and conditions, as printed to the terminal."""
        out = [f"## {self.name}  ({self.date}, {self.machine.get('cores')} cores {self.machine.get('cpu')}, "
               f"load {self.load_before} -> {self.load_after}, {self.seconds:.0f} s)", "", self.table(), ""]
        for k, v in self.ratios.items():
            goal = f"  (goal {self.goals[k]})" if k in self.goals else ""
            out.append(f"{k}: {v:.4g}{goal}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def write_json(self, path: Path) -> Path:
        """Write the report as JSON (parent folders created)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        return path


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, its reaped children and its live descendants.

    The difference across a measurement is the CPU a multi-process reader (loader workers, Ray's
    workers under an in-process Ray) spent on it, whatever the load of the machine.
    """
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            ct = child.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total
