"""What `pipeline run` shows on the terminal: the pipeline's own lines and one progress bar per training stage.

Everything else the process writes — Ray's and DeepSpeed's start-up lines, the worker logs Ray forwards,
repeated warnings — goes to the run's log file (`send_output_to_log`), unless `--verbose` keeps it on the
terminal. A stage's bar is read from its MLflow run (the `train/loss` history its rank 0 logs), so it needs
nothing from the workers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_terminal: tuple[TextIO, TextIO] | None = None  # (out, err) on the terminal while the rest goes to a log file


def stdout() -> TextIO:
    """Where the pipeline's own lines go: the terminal, also while the process's output goes to a log file."""
    return _terminal[0] if _terminal else sys.stdout


def stderr() -> TextIO:
    """Where errors go: the terminal's stderr."""
    return _terminal[1] if _terminal else sys.stderr


def send_output_to_log(path: Path) -> None:
    """Send this process's file descriptors 1 and 2 (Python, Ray's core, the worker logs Ray forwards,
    DeepSpeed, compilers) to `path`, appended; `stdout()` and `stderr()` keep writing to the terminal."""
    global _terminal
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = (os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _terminal = terminal


_pending: Path | None = None


def forget_terminal() -> None:
    """Write `stdout()`/`stderr()` to `sys.stdout`/`sys.stderr` again and drop a pending log (an in-process caller
    running the command line once more, e.g. a test; file descriptors 1 and 2 are left as they are)."""
    global _terminal, _pending
    _terminal, _pending = None, None


def log_to_file_later(path: Path) -> None:
    """Send the process's output to `path` once the job's checks have passed (`start_pending_log`): bad
    input stops with its message on the terminal and writes nothing."""
    global _pending
    _pending = path


def start_pending_log() -> None:
    """Start the log file asked for by `log_to_file_later` (if any); the `pipeline` logger's lines go to the
    terminal and to the log."""
    global _pending
    if _pending is None:
        return
    path, _pending = _pending, None
    send_output_to_log(path)
    print(f"Ray, DeepSpeed and worker output: {path} (--verbose shows it here)", file=stdout())
    logger = logging.getLogger("pipeline")
    for handler in list(logger.handlers):  # they write to sys.stdout, now the log: add the same on the terminal
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            terminal = logging.StreamHandler(stdout())
            terminal.setFormatter(handler.formatter)
            logger.addHandler(terminal)


def bar(name: str, step: int, total: int, loss: float | None, rate: float | None, width: int = 24) -> str:
    """`[diffusion] ████████░░░░ 150/300  loss 0.0421  3.2 steps/s  0:47 left`"""
    frac = min(1.0, step / total) if total else 1.0
    filled = round(frac * width)
    parts = [f"[{name}] {'█' * filled}{'░' * (width - filled)} {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if rate:
        left = max(0.0, (total - step) / rate)
        parts += [f"{rate:.2f} steps/s", f"{int(left // 60)}:{int(left % 60):02d} left"]
    return "  ".join(parts)


@contextmanager
def stage_progress(name: str, run_id: str, total: int, start: int = 0, every_s: float = 2.0) -> Iterator[None]:
    """Show stage `name`'s training progress (steps `start`..`total` of its run's `train/loss`) while the
    block runs: one bar redrawn in place on a terminal, else a line at each quarter."""
    from mlflow.tracking import MlflowClient

    out = stdout()
    live = out.isatty()
    if _terminal is None and not live:  # not `pipeline run` (a Tune trial, a test): nobody is watching
        yield
        return
    stop = threading.Event()
    began_ms = time.time() * 1000
    shown = {"quarter": int(4 * start / total) if total else 4, "step": start, "line": ""}

    def draw(final: bool = False) -> None:
        try:
            history = [m for m in MlflowClient().get_metric_history(run_id, "train/loss") if m.step > start]
        except Exception:  # noqa: BLE001 - a store hiccup: the bar waits for the next poll
            return
        history.sort(key=lambda m: m.step)
        step = history[-1].step if history else start
        rate = None  # steps/s between the first and the last logged step, else since the block began
        first_step, first_ms = (history[0].step, history[0].timestamp) if len(history) >= 2 else (start, began_ms)
        if history and history[-1].timestamp > first_ms:
            rate = (history[-1].step - first_step) / ((history[-1].timestamp - first_ms) / 1000)
        line = bar(name, step, total, history[-1].value if history else None, rate)
        quarter = int(4 * step / total) if total else 4
        if live:
            out.write("\r" + line.ljust(len(shown["line"])) + ("\n" if final else ""))
            out.flush()
        elif quarter > shown["quarter"] or (final and step != shown["step"]):
            out.write(line + "\n")
            shown.update(quarter=quarter, step=step)
        shown["line"] = line

    def poll() -> None:
        while not stop.wait(every_s):
            draw()

    thread = threading.Thread(target=poll, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        draw(final=True)
