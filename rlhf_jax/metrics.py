"""Metric writer: `metrics.jsonl` + TensorBoard events + `summary.json`, written by process 0;
and the progress bar every loop shows (`progress_bar`)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def to_python(value):
    """jax/numpy scalars and small arrays → JSON-friendly Python values (NaN/inf kept as str)."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.dtype.kind in "biu":
        return arr.tolist()
    if arr.dtype.kind == "f":
        if arr.ndim == 0:
            f = float(arr)
            return f if math.isfinite(f) else str(f)
        return [to_python(v) for v in arr]
    return str(value)


# When stderr is a file or pipe (a job log), a bar redraws at most this often: each redraw is
# a line's worth of text in the log, and a terminal's 10 redraws a second would be thousands.
NON_TTY_REDRAW_SECONDS = 30.0


def progress_bar(total: int, *, initial: int = 0, desc: str = "", disable: bool = False,
                 file=None):
    """A tqdm bar on stderr: live on a terminal, one redraw per ~30 s in a log file.

    Update its postfix with `bar.set_postfix(..., refresh=False)`: a forced refresh would
    redraw on every call whatever the interval.
    """
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", lambda: False)
    tty = bool(isatty())
    kwargs = dict(dynamic_ncols=True, smoothing=0.1) if tty else dict(
        mininterval=NON_TTY_REDRAW_SECONDS, maxinterval=NON_TTY_REDRAW_SECONDS, ncols=100,
        ascii=True, smoothing=0.1)
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=file, **kwargs)


def _summary_writer_class():
    """`tensorboardX.SummaryWriter`, imported without PyTorch.

    tensorboardX's package import pulls in torch (seconds per process) only to recognise torch
    tensors, inside try/except ImportError; we log Python floats, so hide torch while importing.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _is_main_process() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no JAX backend: a plain single process
        return True


SAMPLES_FILE = "samples.md"
_SECTION = re.compile(r"^## step (\d+)\b", re.MULTILINE)


def truncate_samples(path: Path, step: int) -> None:
    """Drop the `## step N` sections of a samples file with N > `step` (all of them if `step` is
    0: no checkpoint), so a resumed run does not leave two tables for one step."""
    if not path.exists():
        return
    text = path.read_text()
    starts = [(m.start(), int(m.group(1))) for m in _SECTION.finditer(text)]
    cut = next((pos for pos, n in starts if n > step or step == 0), None)
    if cut is None:
        return
    # Sections are appended in step order, so everything from the first later one goes.
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text[:cut].rstrip("\n") + ("\n" if text[:cut].strip() else ""))
    os.replace(tmp, path)


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to `workdir/metrics.jsonl` and TensorBoard scalars.

    `resume_step`: when resuming from a checkpoint at that step, records of later steps (written
    by the interrupted run after its last checkpoint) are dropped, so the file holds one history;
    so are the later `## step N` sections of `workdir/samples.md` (the stages' sample tables),
    which the resumed run writes again. `resume_step=0` (no checkpoint) drops every record.
    """

    def __init__(self, workdir: str | Path, resume_step: int | None = None,
                 enabled: bool | None = None, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = _is_main_process() if enabled is None else enabled
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        if resume_step is not None:
            truncate_samples(self.workdir / SAMPLES_FILE, resume_step)
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge,
                                     flush_secs=30)

    def _truncate_after(self, step: int):
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if rec.get("step", 0) <= step and step > 0:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update(to_python(dict(metrics)))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value,
                                                                                        bool):
                    self._tb.add_scalar(key, value, int(step))

    def write_summary(self, summary: Mapping) -> Path | None:
        """Write `workdir/summary.json` (the run's final numbers)."""
        if not self.enabled:
            return None
        path = self.workdir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_python(dict(summary)), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of `workdir/metrics.jsonl`, in order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
