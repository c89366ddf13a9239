"""Weight planner: every file an ``(arch, model_type)`` needs, resolved before anything is built.

``plan_sources(arch, cfg)`` lists the weight sources of a model config (image encoder, BLIP-2 checkpoint, frozen
LLM, tokenizers, the Q-Former's BERT) with where each is found locally, its size if known and the config key that
points it at a local copy. ``check_sources`` raises ``MissingWeightsError`` naming all of them at once when any is
missing and the network cannot be used, so an offline user learns in a second what to download, instead of after the
1B-parameter ViT was built. ``python -m models.fetch`` prints the plan and downloads what is missing.

Only ``config.json``-level metadata is read here; no tensor, no model class.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import huggingface_hub
import torch

import registry
from common.paths import hub_offline
from models.assets import PACKAGE_PREFIX, package_path
from models.blip2_base import to_plain
from models.checkpoints.sources import HUB_ID
from models.qformer_init import bundled_bert_vocab

# Parameter counts and stored dtype of the official sources (for sizes when nothing is downloaded yet); sizes derived
# from them are estimates and printed as such.
KNOWN_SOURCES: dict[str, tuple[float, str]] = {
    "Salesforce/blip2-opt-2.7b": (3.87e9, "fp32"),
    "Salesforce/blip2-opt-6.7b": (7.75e9, "fp32"),
    "Salesforce/blip2-opt-2.7b-coco": (3.87e9, "fp32"),
    "Salesforce/blip2-opt-6.7b-coco": (7.75e9, "fp32"),
    "Salesforce/blip2-flan-t5-xl": (3.94e9, "fp32"),
    "Salesforce/blip2-flan-t5-xl-coco": (3.94e9, "fp32"),
    "Salesforce/blip2-flan-t5-xxl": (12.23e9, "fp32"),
    "Salesforce/blip2-itm-vit-g": (1.17e9, "fp32"),
    "Salesforce/blip2-itm-vit-g-coco": (1.17e9, "fp32"),
    "facebook/opt-2.7b": (2.65e9, "fp16"),
    "facebook/opt-6.7b": (6.66e9, "fp16"),
    "google/flan-t5-xl": (2.85e9, "fp32"),
    "google/flan-t5-xxl": (11.14e9, "fp32"),
    "bert-base-uncased": (0.11e9, "fp32"),
    "eva_vit_g.pth": (1.0e9, "fp16"),
}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
_HOSTS = {"hub": ("huggingface.co", 443), "url": ("storage.googleapis.com", 443)}


class MissingWeightsError(FileNotFoundError):
    """Weight sources a model needs that are neither local nor downloadable now (the message lists each)."""


@dataclass
class WeightSource:
    role: str  # what the weights are for, e.g. "image encoder"
    source: str  # URL, hub id, path, "tiny:..." or "bundled"
    key: str  # the model config key that names it (override it to point at a local copy)
    kind: str  # "url" | "hub" | "path" | "local" (built or bundled offline)
    local: Path | None  # where it is on disk now, None when missing
    files: tuple[str, ...] = ()  # which files of a hub repo are needed

    @property
    def available(self) -> bool:
        return self.local is not None or self.kind == "local"

    @property
    def size_text(self) -> str:
        if self.local is not None and self.local.exists():
            return f"{_human(_disk_size(self.local))} on disk"
        name = os.path.basename(self.source) if self.kind == "url" else self.source
        if name in KNOWN_SOURCES:
            params, dtype = KNOWN_SOURCES[name]
            return f"~{_human(params * BYTES[dtype])} ({params / 1e9:.2f}B params in {dtype}, estimated)"
        return "size unknown"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _kind(source: str) -> str:
    if source.startswith("tiny:") or source == "bundled":
        return "local"
    if os.path.exists(os.path.expanduser(source)):
        return "path"
    if source.startswith(("http://", "https://")):
        return "url"
    if HUB_ID.match(source) or "/" not in source and not source.endswith((".pth", ".pt", ".safetensors")):
        return "hub"
    return "path"


def _hub_cached(repo_id: str, filename: str) -> Path | None:
    """The cached file of a hub repo (newest snapshot), or None; never touches the network."""
    repo, _, revision = repo_id.partition("@")
    found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def locate(source: str, files: tuple[str, ...] = ("config.json",)) -> tuple[str, Path | None]:
    """(kind, local path or None) of one source, without downloading."""
    if source.startswith(PACKAGE_PREFIX):  # a file inside an installed wheel
        try:
            return "local", Path(package_path(source[len(PACKAGE_PREFIX):]))
        except (FileNotFoundError, ValueError):
            return "path", None
    kind = _kind(source)
    if kind == "path":
        path = Path(os.path.expanduser(source))
        return kind, path if path.exists() else None
    if kind == "url":
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(source.split("?")[0])
        return kind, target if target.exists() else None
    if kind == "hub":
        if source == "bert-base-uncased" and files == ("vocab.txt",):
            try:  # the Q-Former tokenizer's vocabulary ships in a pip package
                return "local", Path(bundled_bert_vocab())
            except (ImportError, FileNotFoundError):
                pass
        found = [_hub_cached(source, f) for f in files]
        return kind, found[0].parent if found and all(found) else None
    return kind, None


def _source(role: str, source: Any, key: str, files: tuple[str, ...] = ("config.json",)) -> WeightSource | None:
    if source in (None, "", "timm") or source is False:
        return None
    kind, local = locate(str(source), files)
    return WeightSource(role, str(source), key, kind, local, files)


def plan_sources(arch: str, cfg: Mapping[str, Any]) -> list[WeightSource]:
    """Every weight source the model config ``cfg`` of ``arch`` reads, in build order."""
    cls = registry.models.get(arch)
    cfg = to_plain(cfg)
    if not hasattr(cls, "weight_plan"):
        return []
    plan = cls.weight_plan(cfg)
    sources: list[WeightSource | None] = []
    checkpoint_key = {"hf": "hf_hub_id", "lavis": "finetuned" if cfg.get("load_finetuned") else "pretrained"}
    llm_key = getattr(cls, "LLM_NAME_KEY", None)
    llm_in_checkpoint = plan["source"] == "hf" and bool(plan["checkpoints"])
    sources.append(_source("image encoder", plan["vit_pretrained"], "vit_pretrained", ("model.safetensors",)))
    for ckpt in plan["checkpoints"]:
        role = "BLIP-2 checkpoint (ViT + Q-Former" + (" + LLM)" if llm_key else ")") if llm_in_checkpoint else \
            "BLIP-2 checkpoint (Q-Former)"
        files = ("config.json", "model.safetensors.index.json") if _kind(str(ckpt)) == "hub" else ("config.json",)
        src = _source(role, ckpt, checkpoint_key[plan["source"]], files[:1])
        sources.append(src)
    sources.append(_source("Q-Former BERT initialisation", plan["bert"], "bert"))
    tokenizer = cfg.get("tokenizer", "bert-base-uncased")
    needs_tokenizer = not llm_key or bool(cfg.get("qformer_text_input"))
    if needs_tokenizer and tokenizer not in (None, "bundled"):
        files = ("vocab.txt",) if tokenizer == "bert-base-uncased" else ("tokenizer_config.json",)
        sources.append(_source("Q-Former tokenizer", tokenizer, "tokenizer", files))
    if llm_key and not (llm_in_checkpoint and not cfg.get("load_llm_weights")):
        llm = (to_plain(cfg.get("llm_kwargs")) or {})
        name = cfg.get(llm_key)
        if cfg.get("load_llm_weights", True) is False and llm.get("config"):
            name = None  # shapes from the config, weights from elsewhere
        sources.append(_source("frozen LLM", name, llm_key))
        gguf = str(llm.get("gguf_file") or "")
        if gguf and ("/" in gguf or gguf.startswith("package:")):  # a bare name is a file inside the LLM's folder
            sources.append(_source("frozen LLM GGUF file", gguf, "llm_kwargs.gguf_file"))
        if llm.get("tokenizer_name_or_path"):
            sources.append(_source("LLM tokenizer", llm["tokenizer_name_or_path"], "llm_kwargs.tokenizer_name_or_path",
                                   ("tokenizer_config.json",)))
    return [s for s in sources if s is not None]


def network_reachable(kinds: set[str], timeout: float = 1.0) -> bool:
    """Whether the hosts of these source kinds answer a TCP connect within ``timeout`` s (no HTTP request)."""
    for kind in kinds:
        host = _HOSTS.get(kind)
        if host is None:
            continue
        try:
            with socket.create_connection(host, timeout=timeout):
                pass
        except OSError:
            return False
    return True


def missing_message(label: str, missing: list[WeightSource], reason: str) -> str:
    lines = [f"{label}: {len(missing)} weight source{'s' if len(missing) > 1 else ''} not available ({reason}):"]
    for s in missing:
        where = {"hub": "not in the Hugging Face cache", "url": "not in the torch hub download cache",
                 "path": "no such file or directory"}.get(s.kind, "missing")
        lines.append(f"  - {s.role}: {s.source!r} [{s.size_text}] {where}")
        lines.append(f"      point it at a local copy: {s.key}=/path/to/local/copy   "
                     f"(Python: load_model(..., {s.key.split('.')[0]}=...); YAML/--options: model.{s.key}=...)")
    lines.append(f"  download them where there is network: python -m models.fetch {label.replace('/', ' ')}")
    return "\n".join(lines)


def check_sources(arch: str, cfg: Mapping[str, Any], label: str | None = None) -> list[WeightSource]:
    """The plan of ``cfg``; raises ``MissingWeightsError`` listing every missing source when they cannot be downloaded
    now (``HF_HUB_OFFLINE`` set, or the hosts do not answer)."""
    sources = plan_sources(arch, cfg)
    missing = [s for s in sources if not s.available]
    if not missing:
        return sources
    label = label or arch
    if any(s.kind == "path" for s in missing):
        raise MissingWeightsError(missing_message(label, missing, "local paths do not exist"))
    if hub_offline():
        raise MissingWeightsError(missing_message(label, missing, "HF_HUB_OFFLINE is set"))
    if not network_reachable({s.kind for s in missing}):
        raise MissingWeightsError(missing_message(label, missing, "no network"))
    return sources
