"""GGUF checkpoints as frozen LLMs: dequantised once, cached as an ordinary Hugging Face directory.

``transformers`` reads a GGUF file (llama.cpp's format: Llama, Qwen2, Gemma, Phi-3, T5, ... quantised or not) with
``from_pretrained(dir, gguf_file=...)``, dequantising every tensor to fp32; that takes tens of seconds even for a
135M model. ``gguf_checkpoint(path)`` does it once and writes ``config.json`` + ``model.safetensors`` (fp32) +
the tokenizer files under ``<cache root>/gguf/<file stem>-<path hash>/``; later loads read that directory like any
local checkpoint. The directory records the GGUF file's fingerprint (size, modification time, SHA-256 of its first
and last MiB, which hold the metadata and the last tensors) and is rebuilt when the file changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from common.paths import cache_root

logger = logging.getLogger(__name__)

GGUF_FORMAT_VERSION = 1  # bump when what the cache directory holds changes
MANIFEST = "gguf_source.json"
_CHUNK = 1 << 20


def gguf_cache_root() -> Path:
    return cache_root() / "gguf"


def file_fingerprint(path: Path) -> dict:
    """What identifies the file's content cheaply: size, mtime (ns), SHA-256 of its first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_CHUNK))
        if stat.st_size > 2 * _CHUNK:
            handle.seek(-_CHUNK, os.SEEK_END)
        digest.update(handle.read(_CHUNK))
    return {"format": GGUF_FORMAT_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_tail_sha256": digest.hexdigest(), "transformers": transformers.__version__.split(".")[0]}


def resolve_gguf_path(gguf_file: str | os.PathLike, model_name_or_path: str | None = None) -> Path:
    """The GGUF file: ``gguf_file`` as given when it is a file, else inside the directory ``model_name_or_path``."""
    candidates = [Path(os.path.expanduser(os.fspath(gguf_file)))]
    if model_name_or_path and not candidates[0].is_absolute():
        candidates.insert(0, Path(os.path.expanduser(model_name_or_path)) / candidates[0])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"gguf_file={os.fspath(gguf_file)!r}: no such file (looked at {', '.join(map(str, candidates))}); expected a "
        f"GGUF file path, or a file name inside the directory given as the LLM's model_name_or_path")


def gguf_checkpoint(gguf_path: str | os.PathLike, auto_class: str = "AutoModelForCausalLM") -> Path:
    """Directory with the dequantised checkpoint (+ tokenizer) of the GGUF file ``gguf_path``, built on first use.

    ``auto_class``: the ``transformers`` Auto class that builds the model (``AutoModelForSeq2SeqLM`` for T5 files).
    """
    path = Path(gguf_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the magic bytes 'GGUF')")
    fingerprint = file_fingerprint(path)
    key = hashlib.sha1(f"{path}|{auto_class}".encode()).hexdigest()[:10]
    target = gguf_cache_root() / f"{path.stem}-{key}"
    if _is_current(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("dequantising %s once into %s (later loads read the cache)", path, target)
        _convert(path, tmp, auto_class)
        (tmp / MANIFEST).write_text(json.dumps({"source": str(path), "auto_class": auto_class, **fingerprint},
                                               indent=1))
        if target.exists():  # stale: the GGUF file changed
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        if not _is_current(target, fingerprint):  # a concurrent builder may have placed the same result
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(target: Path, fingerprint: dict) -> bool:
    try:
        saved = json.loads((target / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(saved.get(k) == v for k, v in fingerprint.items()) and (target / "config.json").is_file()


def _convert(path: Path, out_dir: Path, auto_class: str) -> None:
    """Dequantise ``path`` with transformers and save an fp32 safetensors checkpoint and the tokenizer."""
    auto_cls = getattr(transformers, auto_class)
    kwargs = {"gguf_file": path.name}
    with torch.device("cpu"):  # also when the caller builds under torch.device("meta")
        model = auto_cls.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    # The loaded model keeps a GGUF "quantizer" that forbids saving, though its weights are plain fp32 tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
