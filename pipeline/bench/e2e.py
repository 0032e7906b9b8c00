"""e2e: wall time and peak memory of the README's main job (`pipeline run jobs/ldm.yaml`).

The job runs once, in a fresh temporary working directory (its own data, MLflow store and Ray
temp dir, so it neither reuses cached stages nor joins another Ray instance on the machine),
under `/usr/bin/time -v`. By default the code is a `git archive` snapshot of HEAD put first on
PYTHONPATH (driver and Ray workers alike): a long run in a shared working tree would otherwise
mix the driver's modules, loaded at start, with newer ones the workers import later
(`--worktree` runs the working tree as it is). A sampler thread follows the whole process tree (driver, in-process
Ray's GCS/raylet, Ray Data and Ray Train workers) once a second: per-process peak RSS, the peak
of the tree's summed RSS and PSS (PSS splits shared pages such as the object store fairly), and
the load average.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.bench import RESULTS_DIR, Options, Report, loadavg

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "ldm.yaml"
QUICK_SETS = [f"stages.{s}.train.steps={n}" for s, n in
              [("autoencoder", 20), ("classifier", 20), ("diffusion", 20), ("distill", 20)]] + [
    "eval.num_samples=50", "stages.diffusion.sampling.num_samples=50", "stages.distill.sampling.num_samples=50"]


class TreeSampler(threading.Thread):
    """Samples memory of a process and all its descendants, and the load average, every `period` s."""

    def __init__(self, pid: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop = threading.Event()
        self.peak_rss: dict[int, tuple[str, int]] = {}  # pid -> (name, peak rss bytes)
        self.peak_tree_rss = 0
        self.peak_tree_pss = 0
        self.load1: list[float] = []
        self.samples = 0
        self.driver_pid: int | None = None  # the job's own process: the child of /usr/bin/time

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                if self.driver_pid is None:
                    direct = root.children()
                    self.driver_pid = direct[0].pid if direct else None
            except psutil.NoSuchProcess:
                break
            rss_sum = pss_sum = 0
            for p in procs:
                try:
                    if p.pid == self.pid:  # /usr/bin/time itself
                        continue
                    mem = p.memory_full_info()
                    name = " ".join(p.cmdline()[:3])[:80] or p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss_sum += mem.rss
                pss_sum += getattr(mem, "pss", mem.rss)
                old = self.peak_rss.get(p.pid, ("", 0))[1]
                if mem.rss > old:
                    self.peak_rss[p.pid] = (name, mem.rss)
            self.peak_tree_rss = max(self.peak_tree_rss, rss_sum)
            self.peak_tree_pss = max(self.peak_tree_pss, pss_sum)
            self.load1.append(loadavg()[0])
            self.samples += 1
            self.stop.wait(self.period)


def _parse_time_v(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    if m:
        h, mnt, s = int(m.group(1) or 0), int(m.group(2)), float(m.group(3))
        out["wall_s"] = h * 3600 + mnt * 60 + s
    for key, pat in [("max_rss_kb", r"Maximum resident set size \(kbytes\): (\d+)"),
                     ("user_s", r"User time \(seconds\): ([\d.]+)"),
                     ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                     ("cpu_percent", r"Percent of CPU this job got: (\d+)%"),
                     ("exit_status", r"Exit status: (\d+)")]:
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    return out


def _stage_times(log: str) -> dict[str, float]:
    """Per-stage seconds from the job's closing table."""
    out = {}
    for m in re.finditer(r"^(\w+)\s+(trained|skipped|encoded|cached)\s+\S+\s+\S+\s+(\d+)s$", log, re.M):
        out[m.group(1)] = float(m.group(3))
    return out


def run(opts: Options) -> Report:
    """Run the main job once under `/usr/bin/time -v` and report wall time and peak memory."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    if not Path(time_bin).is_file():
        raise SystemExit("e2e needs GNU time (/usr/bin/time): apt-get install time")
    exe = Path(sys.executable).with_name("pipeline")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "pipeline"]
    extra = [a for a in opts.extra if a != "--worktree"]
    sets = [a for s in (QUICK_SETS if opts.quick else []) for a in ("--set", s)]
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    env = {**os.environ, "RAY_TMPDIR": str(work / "ray"), "PYTHONUNBUFFERED": "1"}
    job, commit = JOB, "worktree"
    if "--worktree" not in opts.extra:
        src = work / "src"
        src.mkdir()
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        base = [sys.executable, "-m", "pipeline"]
        job = src / "jobs" / "ldm.yaml"
    cmd = [time_bin, "-v", *base, "run", str(job), *sets, *extra]
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    (work / "ray").mkdir()
    log_path = work / "job.log"
    load0 = loadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log_f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log_f, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    load1 = loadavg()
    text = log_path.read_text(errors="replace")
    tv = _parse_time_v(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept_log = RESULTS_DIR / ("e2e-quick-job.log" if opts.quick else "e2e-job.log")
    shutil.copy(log_path, kept_log)
    shutil.rmtree(work, ignore_errors=True)

    driver = sampler.peak_rss.get(sampler.driver_pid or -1, ("", 0))
    sum_of_peaks = sum(r for _, r in sampler.peak_rss.values())
    top = sorted(sampler.peak_rss.values(), key=lambda x: -x[1])[:6]
    gib = 2.0**30
    rows: list[dict[str, Any]] = [
        {"quantity": "wall time (min)", "value": tv.get("wall_s", wall) / 60},
        {"quantity": "exit status", "value": rc},
        {"quantity": "CPU time user+sys (min)", "value": (tv.get("user_s", 0) + tv.get("sys_s", 0)) / 60},
        {"quantity": "max RSS, time -v (GiB; largest reaped process)", "value": tv.get("max_rss_kb", 0) / 2**20},
        {"quantity": "driver peak RSS, sampled (GiB)", "value": driver[1] / gib},
        {"quantity": "process tree peak total RSS (GiB)", "value": sampler.peak_tree_rss / gib},
        {"quantity": "process tree peak total PSS (GiB)", "value": sampler.peak_tree_pss / gib},
        {"quantity": "sum of per-process peak RSS (GiB; upper bound)", "value": sum_of_peaks / gib},
        {"quantity": "processes seen", "value": len(sampler.peak_rss)},
        {"quantity": "load avg (1 min) during run: median", "value": _median(sampler.load1)},
        {"quantity": "load avg (1 min) during run: max", "value": max(sampler.load1, default=float("nan"))},
    ]
    for stage, s in _stage_times(text).items():
        rows.append({"quantity": f"stage {stage} (s)", "value": s})
    ratios = {"e2e_wall_min": tv.get("wall_s", wall) / 60}
    notes = [f"job log: {kept_log}", "largest processes (peak RSS): " +
             "; ".join(f"{n} {r / gib:.2f} GiB" for n, r in top)]
    if rc != 0:
        notes.append(f"the job FAILED with exit status {rc}; see the log")
    return Report(name="e2e", command="python -m pipeline.bench e2e" + (" --quick" if opts.quick else ""),
                  columns=["quantity", "value"], rows=rows, ratios=ratios, goals={"e2e_wall_min": "< 10"},
                  notes=notes, params={"cmd": cmd, "samples": sampler.samples, "commit": commit},
                  load_before=load0, load_after=load1)


def _median(xs: list[float]) -> float:
    from pipeline.bench import median

    return median(xs)
