"""List, and download when online, the weights a zoo model needs; print the memory each precision takes.

    python -m models.fetch blip2_opt pretrain_opt2.7b            # plan + download what is missing
    python -m models.fetch blip2_t5 pretrain_flant5xxl --dry-run  # plan only (works offline)
    python -m models.fetch blip2_opt tiny --options llm_kwargs.quantization=int8

Memory per precision counts the weights only (activations and the KV cache come on top); the frozen parts (image
encoder, LLM) take the precision, the trainable Q-Former stays fp32. int8 is the weight-only quantised LLM.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import huggingface_hub
from omegaconf import OmegaConf

from common.paths import hub_offline
from models.checkpoints import resolve_source
from models.weight_sources import BYTES, KNOWN_SOURCES, WeightSource, _human, plan_sources
from models.zoo import _zoo_yaml, build_model_skeleton


def download(source: WeightSource) -> str:
    """Fetch one missing source into its cache (hub snapshot or torch hub file); returns the local path."""
    if source.kind == "hub":
        repo_id, _, revision = source.source.partition("@")
        return huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    return str(resolve_source(source.source))


def parameter_counts(arch: str, model_type: str, overrides: dict[str, Any]) -> dict[str, int] | None:
    """{"frozen_vision", "frozen_llm", "trainable", "other"} parameter counts from the meta-device skeleton (no weight
    read); None when the LLM's config.json is not available yet."""
    try:
        model = build_model_skeleton(arch, model_type, **overrides)
    except (OSError, ValueError) as err:
        print(f"(parameter count needs the LLM's config.json: {str(err).splitlines()[0][:160]})")
        return None
    counts = {"frozen_vision": 0, "frozen_llm": 0, "trainable": 0, "other": 0}
    llm = getattr(model, "llm", None) if hasattr(model, "LLM_ATTR") else None
    llm_ids = {id(p) for p in llm.parameters()} if llm is not None else set()
    vision_ids = {id(p) for p in model.visual_encoder.parameters()}
    for p in model.parameters():
        key = ("frozen_llm" if id(p) in llm_ids else "frozen_vision" if id(p) in vision_ids
               else "trainable" if p.requires_grad else "other")
        counts[key] += p.numel()
    return counts


def memory_table(counts: dict[str, int]) -> list[str]:
    rows = [f"{'precision':<10} {'image encoder':>14} {'LLM':>12} {'Q-Former etc.':>14} {'total':>12}"]
    rest = counts["trainable"] + counts["other"]
    for precision in ("fp32", "bf16", "fp16", "int8"):
        vision_bytes = counts["frozen_vision"] * BYTES["bf16" if precision == "int8" else precision]
        llm_bytes = counts["frozen_llm"] * BYTES[precision]
        total = vision_bytes + llm_bytes + rest * 4
        rows.append(f"{precision:<10} {_human(vision_bytes):>14} {_human(llm_bytes):>12} {_human(rest * 4):>14} "
                    f"{_human(total):>12}")
    rows.append("(int8: LLM linear weights int8 with per-channel scales, image encoder bf16; weights only)")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", help="registered model arch, e.g. blip2_opt")
    parser.add_argument("model_type", help="zoo type, e.g. pretrain_opt2.7b")
    parser.add_argument("--dry-run", action="store_true", help="list only, download nothing")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    args = parser.parse_args(argv)

    try:
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.options))) if args.options else {}
        cfg = OmegaConf.merge(_zoo_yaml(args.arch, args.model_type).model, OmegaConf.create(overrides))
        sources = plan_sources(args.arch, cfg)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.arch}/{args.model_type}: {len(sources)} weight source(s)")
    failed = 0
    for s in sources:
        state = f"local: {s.local}" if s.local is not None else ("built offline" if s.kind == "local" else "MISSING")
        print(f"  - {s.role:<34} {s.source}\n      {s.size_text}; {state}; override: model.{s.key}")
        if s.available or args.dry_run:
            continue
        if s.kind == "path" or hub_offline():
            print(f"      cannot download ({'a local path' if s.kind == 'path' else 'HF_HUB_OFFLINE is set'})")
            failed += 1
            continue
        try:
            print(f"      downloaded: {download(s)}")
        except Exception as err:  # network, permissions, unknown repo: report and go on with the others
            print(f"      download failed: {type(err).__name__}: {err}")
            failed += 1
    counts = parameter_counts(args.arch, args.model_type, overrides)
    if counts is not None:
        print(f"parameters: image encoder {counts['frozen_vision'] / 1e6:.1f}M, LLM {counts['frozen_llm'] / 1e6:.1f}M, "
              f"trainable {counts['trainable'] / 1e6:.1f}M, other {counts['other'] / 1e6:.1f}M")
        print("\n".join(memory_table(counts)))
    else:
        known = [s for s in sources if (s.source in KNOWN_SOURCES)]
        for s in known:
            params, _ = KNOWN_SOURCES[s.source]
            print(f"{s.source}: ~{params / 1e9:.2f}B params -> " + ", ".join(
                f"{p} {_human(params * BYTES[p])}" for p in ("fp32", "bf16", "int8")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
