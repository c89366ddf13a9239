"""Resumable checkpoints: trainable weights (safetensors) + optimizer + run state, verified on load.

Layout of one checkpoint directory::

    <job_dir>/checkpoints/step_00000012/
        model.safetensors   trainable parameters and non-frozen buffers only
        optimizer.pt        optimizer state dict (torch.load(weights_only=True) safe)
        state.pt            epoch, global step, data position, LR schedule, GradScaler,
                            best metric, log position, RNG states of every rank
        manifest.json       size and sha256 of every other file; written last

Each directory is written under a temporary name (``.step_00000012.tmp<pid>``), its files
fsynced, the manifest written last, and the directory renamed into place: a run killed while
saving leaves only a temporary folder, which the next run on the job removes. Loading checks
every file against the manifest, so a checkpoint truncated or overwritten later is refused with
the file and checkpoint named, and ``--resume auto`` falls back to the previous valid one.

Testing hook: ``BLIP2_FAULT_INJECT=<dir name>/<file>:<byte offset>:<kill|enospc>`` makes the writer
of that file stop at that byte, then SIGKILL the process or fail with "no space left on device"
(a real partial file is left on disk either way). Unset, the writer only counts and hashes bytes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

logger = logging.getLogger("runners")

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "blip2-checkpoint/1"
FAULT_ENV = "BLIP2_FAULT_INJECT"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_DIR = re.compile(r"^\.(.+)\.(tmp|old)(\d+)$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint (or a file given as one) cannot be used; the message names the file and the checkpoint."""


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (numpy arrays become tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- errors ------------------------------------------------------------------------------------
def os_error_cause(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming the cause and the path of a failed read or write."""
    where = path or err.filename or "?"
    causes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.EIO: "input/output error (failing disk?)",
              errno.ENOENT: "no such file or directory", errno.EFBIG: "file too large",
              errno.ENOTDIR: "not a directory"}
    return f"{causes.get(err.errno, err.strerror or str(err))}: {where}"


def describe_file(path: Path) -> str:
    """What a file looks like from its first bytes (for "not a checkpoint" messages)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as err:
        return f"unreadable: {os_error_cause(err, path)}"
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format)"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < size:
        return "a safetensors file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (legacy torch.save format)"
    signatures = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                  b"\x1f\x8b": "gzip data", b"GGUF": "a GGUF model file", b"\x93NUMPY": "a NumPy .npy array"}
    for magic, what in signatures.items():
        if head.startswith(magic):
            return what
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON text"
    try:
        first = head.decode("utf-8").splitlines()[0][:40]
    except (UnicodeDecodeError, IndexError):
        return f"{size} bytes of unknown binary data"
    return f"a text file starting {first!r}"


def _not_a_checkpoint(path: Path, detail: str = "") -> CheckpointError:
    what = describe_file(path)
    return CheckpointError(f"not a checkpoint: {path} ({what}{'; ' + detail if detail else ''})")


def _torch_load(path: Path, checkpoint: Path | None = None) -> Any:
    """torch.load(weights_only=True) with errors that name the file (and its checkpoint directory)."""
    where = f"checkpoint {checkpoint}: {path.name}" if checkpoint else str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {where}: {os_error_cause(err, path)}") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        what = describe_file(path)
        if "weights only load failed" in str(err).lower():
            found = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
            detail = found[0].split(" was not ")[0].split(". Please")[0] if found else "a non-tensor object"
            raise CheckpointError(
                f"{where} holds Python objects that loading safely refuses ({detail}); it is not a weights-only "
                f"checkpoint. Re-save its tensors as a state dict or safetensors"
            ) from None
        if checkpoint is None and not what.startswith(("a zip", "a Python pickle")):
            raise _not_a_checkpoint(path) from None
        reason = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{where} is damaged or not a torch file ({what}: {reason})") from None


# -- weights -----------------------------------------------------------------------------------
def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``trainable_state_dict()`` (contract), or every requires_grad parameter."""
    if hasattr(model, "trainable_state_dict"):
        sd = model.trainable_state_dict()
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # safetensors refuses shared storage and needs contiguous CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint directory (verified against its manifest), a .safetensors file,
    or a torch file (``{"model": sd}`` or sd), always loaded without running pickled code."""
    path = Path(path)
    checkpoint = None
    if path.is_dir():
        checkpoint = path
        if (path / MANIFEST_FILE).is_file():
            verify_checkpoint(path, require=(MODEL_FILE,))
        path = path / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"not a checkpoint: {checkpoint} (a directory without {MODEL_FILE})")
    elif not path.exists():
        raise FileNotFoundError(f"no weights at {path} (expected a checkpoint directory or a weights file)")
    what = describe_file(path)
    if what == "a safetensors file" or path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {os_error_cause(err, path)}") from None
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            if checkpoint is None and what != "a safetensors file":
                raise _not_a_checkpoint(path) from None
            where = f"checkpoint {checkpoint}: {MODEL_FILE}" if checkpoint else str(path)
            raise CheckpointError(f"{where} is damaged ({what}: {str(err).splitlines()[0][:200]})") from None
    state = _torch_load(path, checkpoint)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _not_a_checkpoint(path, "it does not hold a state dict of tensors, nor one under 'model'")
    return state

def check_weights_source(path: str | os.PathLike) -> None:
    """Before anything is built: ``path`` is a verified checkpoint directory or a weights file
    (safetensors or torch format), else CheckpointError "not a checkpoint: <path> (<what it looks like>)"."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            verify_checkpoint(path, require=(MODEL_FILE,))
        elif not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"not a checkpoint: {path} (a directory without {MODEL_FILE})")
        return
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (expected a checkpoint directory or a weights file)")
    if describe_file(path) not in ("a safetensors file", "a zip archive (torch.save format)",
                                   "a Python pickle (legacy torch.save format)"):
        raise _not_a_checkpoint(path)


def load_trainable_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a trainable-only state dict into ``model``; keys missing from the file must all be
    frozen (requires_grad False) parameters or frozen buffers, and no key may be unknown."""
    state = read_weights(path)
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trainable = sorted(set(result.missing_keys) & trainable)
    if result.unexpected_keys or missing_trainable:
        raise KeyError(
            f"checkpoint {path} does not match the model: unexpected keys {result.unexpected_keys[:10]}, "
            f"trainable parameters missing from it {missing_trainable[:10]}"
        )


# -- writing ----------------------------------------------------------------------------------------
def _fault_for(directory: Path, name: str) -> tuple[int, str] | None:
    """(byte offset, action) if the testing hook targets ``<directory name>/<name>``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    target, offset, action = spec.rsplit(":", 2)
    dir_name = _TEMP_DIR.match(directory.name).group(1) if _TEMP_DIR.match(directory.name) else directory.name
    return (int(offset), action) if target == f"{dir_name}/{name}" else None


class _HashingWriter:
    """A binary file writer that counts and sha256-hashes what it writes (and hosts the fault hook)."""

    def __init__(self, path: Path, fault: tuple[int, str] | None) -> None:
        self.path, self.fault = path, fault
        self.sha, self.size = hashlib.sha256(), 0
        self.fh = open(path, "wb")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.fault is not None and self.size <= self.fault[0] < self.size + len(view):
            self._inject(view[: self.fault[0] - self.size])
        self.fh.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)

    def _inject(self, head: memoryview) -> None:
        self.fh.write(head)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.fault[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> dict[str, Any]:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def _write_file(directory: Path, name: str, produce) -> dict[str, Any]:
    """Write ``directory/name`` with ``produce(writer)``; returns its manifest entry."""
    writer = _HashingWriter(directory / name, _fault_for(directory, name))
    try:
        produce(writer)
    except BaseException:
        writer.fh.close()
        raise
    return writer.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint directory atomically (temp directory, manifest last, rename); returns its path.
    A failed write removes the temporary directory and raises CheckpointError naming the cause and file."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    current = tmp
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        current = tmp / MODEL_FILE
        payload = safetensors_bytes(model_state, metadata={"format": "pt"})
        files[MODEL_FILE] = _write_file(tmp, MODEL_FILE, lambda w: w.write(payload))
        del payload
        if optimizer_state is not None:
            current = tmp / OPTIMIZER_FILE
            files[OPTIMIZER_FILE] = _write_file(tmp, OPTIMIZER_FILE, lambda w: torch.save(optimizer_state, w))
        current = tmp / STATE_FILE
        files[STATE_FILE] = _write_file(tmp, STATE_FILE, lambda w: torch.save(state, w))
        manifest = json.dumps({"format": MANIFEST_FORMAT, "global_step": state.get("global_step"),
                               "files": files}, indent=1).encode()
        current = tmp / MANIFEST_FILE
        _write_file(tmp, MANIFEST_FILE, lambda w: w.write(manifest))
        _fsync_dir(tmp)
        current = final
        if final.exists():  # re-saving the same name (e.g. best): swap via a second rename
            old = final.parent / f".{final.name}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {os_error_cause(cause, current)} "
                                  f"(the partial checkpoint was removed)") from None
        raise
    return final


def clean_temporaries(job_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted ``save_checkpoint`` left in ``job_dir`` and its ``checkpoints/``; a
    checkpoint caught between its two swap renames is put back. Call only while holding the job."""
    notes = []
    for root in (Path(job_dir), Path(job_dir) / "checkpoints"):
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            match = _TEMP_DIR.match(path.name)
            if not match or not path.is_dir():
                continue
            final = root / match.group(1)
            if match.group(2) == "old" and not final.exists():
                os.replace(path, final)
                notes.append(f"restored {final} from {path.name}")
            else:
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed the unfinished {path}")
    return notes


# -- reading ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(directory: str | os.PathLike, require: tuple[str, ...] = (STATE_FILE,)) -> dict:
    """Check every file of a checkpoint directory against its manifest; returns the manifest.
    Raises CheckpointError naming the checkpoint, the file and what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist (expected a directory written by the runner, "
                              f"e.g. <output_dir>/<job>/checkpoints/step_00000100)")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {MANIFEST_FILE} (its write never finished, or it was "
                              f"not written by the runner)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict)
    except OSError as err:
        raise CheckpointError(f"checkpoint {directory}: cannot read {MANIFEST_FILE}: {os_error_cause(err)}") from None
    except Exception:  # noqa: BLE001 - bad JSON, missing keys, wrong format
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST_FILE} is damaged ({describe_file(manifest_path)}, "
                              f"{manifest_path.stat().st_size} bytes)") from None
    for name in require:
        if name not in files:
            raise CheckpointError(f"checkpoint {directory}: its manifest lists no {name}")
    for name, entry in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
            if size != entry["size"]:
                raise CheckpointError(f"checkpoint {directory}: {name} has {size} bytes, its manifest says "
                                      f"{entry['size']} (truncated or overwritten)")
            if _sha256(path) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {directory}: {name} does not match its sha256 in the manifest "
                                      f"(corrupted)")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {directory}: {name} is missing") from None
        except OSError as err:
            raise CheckpointError(f"checkpoint {directory}: cannot read {name}: {os_error_cause(err)}") from None
    return manifest


def load_checkpoint_state(directory: str | os.PathLike) -> tuple[dict | None, dict]:
    """(optimizer state or None, run state) of a verified checkpoint directory, loaded weights_only."""
    directory = Path(directory)
    manifest = verify_checkpoint(directory)
    state = _torch_load(directory / STATE_FILE, directory)
    optimizer = _torch_load(directory / OPTIMIZER_FILE, directory) if OPTIMIZER_FILE in manifest["files"] else None
    return optimizer, state


def step_checkpoints(job_dir: str | os.PathLike) -> list[Path]:
    """Published step checkpoint directories of a job, oldest first (not yet verified)."""
    root = Path(job_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(job_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(newest step checkpoint that verifies, [why each newer one was skipped])."""
    skipped = []
    for path in reversed(step_checkpoints(job_dir)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, skipped


def latest_checkpoint(job_dir: str | os.PathLike) -> Path | None:
    return latest_valid_checkpoint(job_dir)[0]


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Total size of a checkpoint directory's files."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def prune_checkpoints(job_dir: str | os.PathLike, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (never those in ``keep``)."""
    if keep_last <= 0:
        return
    ckpts = step_checkpoints(job_dir)
    for path in ckpts[:-keep_last]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
