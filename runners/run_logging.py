"""Job directories, JSON-lines metrics and optional TensorBoard; only the main process writes."""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

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
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "run.tensorboard=True needs the tensorboard package: pip install tensorboard"
                ) from err
            self.tb = SummaryWriter(log_dir=str(job_dir / "tensorboard"))

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
