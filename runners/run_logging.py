"""Job directories, JSON-lines metrics and optional TensorBoard; only the main process writes."""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from runners.checkpointing import os_error_cause

logger = logging.getLogger("runners")


def new_job_id() -> str:
    """Timestamp to the second + pid + random suffix: concurrent runs never share a directory."""
    return f"{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}_{secrets.token_hex(3)}"


def create_job_dir(output_dir: str | os.PathLike, job_id: str, exist_ok: bool = False) -> Path:
    """``output_dir/<job_id>``, created exclusively unless resuming into it (``exist_ok``)."""
    job_dir = Path(output_dir).expanduser() / job_id
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    job_dir.mkdir(exist_ok=exist_ok)
    return job_dir


LOCK_FILE = ".lock"


class JobClaimError(RuntimeError):
    """The job directory is held by another run, exists when a fresh run was asked for, or cannot be written."""


def _holder(job_dir: Path) -> str:
    """Who holds ``job_dir`` according to its lock file (pid, host, start time, command)."""
    for _ in range(20):  # the holder writes its line right after creating the file
        try:
            info = json.loads((job_dir / LOCK_FILE).read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            info = None
        if info:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
            return f"pid {info.get('pid')} on {info.get('host')}, started {started}: {info.get('command')}"
        time.sleep(0.05)
    return "a run whose lock file has no details yet"


class JobLock:
    """Exclusive hold on a job directory for the life of a run: an ``flock`` on ``<job_dir>/.lock``
    (released by the kernel when the process dies, so a killed run never blocks its resume)."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        path = job_dir / LOCK_FILE
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise JobClaimError(f"cannot write to the job directory: {_cause(err, path)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise JobClaimError(f"job directory {job_dir} is in use by another run ({_holder(job_dir)}); "
                                f"wait for it to end or choose another run.job_name") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                "command": " ".join(sys.argv)}
        try:  # also proves the directory writable before anything is built
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)
            os.fsync(self.fd)
        except OSError as err:
            self.release()
            raise JobClaimError(f"cannot write to the job directory: {_cause(err, path)}") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _cause(err: OSError, path: Path) -> str:
    return os_error_cause(err, path)


def claim_job_dir(output_dir: str | os.PathLike, job_id: str, fresh: bool) -> tuple[Path, JobLock]:
    """Create (``fresh``: exclusively) and lock ``output_dir/<job_id>``; raise JobClaimError naming the run
    that holds it, or the path and cause when it cannot be created or written."""
    output_dir = Path(output_dir).expanduser()
    job_dir = output_dir / job_id
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        job_dir.mkdir()
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        raise JobClaimError(f"cannot create the job directory: {_cause(err, Path(err.filename or job_dir))}") \
            from None
    if not created and fresh:
        holder = (f"it is in use by another run ({_holder(job_dir)})" if _is_locked(job_dir)
                  else "pass --resume auto to continue it")
        raise JobClaimError(f"job directory {job_dir} already exists: {holder}; or choose another run.job_name")
    return job_dir, JobLock(job_dir)


def _is_locked(job_dir: Path) -> bool:
    try:
        fd = os.open(job_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def release_unused_job_dir(job_dir: Path) -> bool:
    """Remove a job directory whose run failed before writing any checkpoint (so the job name can be
    reused); returns True when removed. Directories holding a checkpoint or result are kept."""
    keep = [p for p in job_dir.iterdir() if p.name not in (LOCK_FILE, "log.jsonl", "config.yaml")
            and not (p.name == "checkpoints" and not any(p.iterdir()))]
    if keep:
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return True


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def setup_logging(is_main: bool) -> None:
    """INFO on the main process, warnings only elsewhere (no monkey-patched print)."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to ``<job_dir>/log.jsonl`` (and TensorBoard scalars)."""

    def __init__(self, job_dir: Path | None, tensorboard: bool = False) -> None:
        self.path = job_dir / "log.jsonl" if job_dir is not None else None
        self.tb = None
        if job_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional, only with run.tensorboard
            except ImportError as err:
                raise ImportError(
                    "run.tensorboard=True needs the tensorboard package: pip install tensorboard"
                ) from err
            self.tb = SummaryWriter(log_dir=str(job_dir / "tensorboard"))

    def position(self) -> int:
        """Bytes written so far (stored in checkpoints: a resume drops what was logged after it)."""
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def rewind(self, position: int) -> int:
        """Drop the records written after byte ``position`` (steps a resumed run replays, so each is logged
        once); returns the number of records dropped."""
        if self.path is None or not self.path.exists() or self.path.stat().st_size <= position:
            return 0
        with open(self.path, "r+b") as fh:
            fh.seek(position)
            dropped = fh.read().count(b"\n")
            fh.truncate(position)
        return dropped

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **_jsonable(record)}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None and step is not None:
            prefix = record.get("type", "train")
            split = record.get("split")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    tag = f"{prefix}/{split}/{key}" if split else f"{prefix}/{key}"
                    self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
