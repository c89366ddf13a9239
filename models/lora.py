"""LoRA adapters (through ``peft``) on the frozen LLM or the Q-Former of a stage-2 model, set by config:

    model:
      lora: {target: llm, r: 8, alpha: 16, dropout: 0.05}        # or target: qformer, or [llm, qformer]

``apply_lora`` injects low-rank adapters in place (``peft.inject_adapter_in_model``: module names are kept, each
adapted ``nn.Linear`` gains ``base_layer`` + ``lora_A``/``lora_B``). Only the adapters train: the LLM stays frozen
(its adapters are its only trainable tensors), and with ``target: qformer`` the Q-Former's own weights freeze too
(the query tokens and the LLM projection still train). Checkpoints hold the trainable tensors only (the adapters),
resume like any other run, and ``merge_lora`` folds the adapters into the weights for export (``export_to_hf``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

TARGETS = ("llm", "qformer")
QFORMER_MODULES = ("query", "value")  # self- and cross-attention projections of every Q-Former layer


@dataclass
class LoraSettings:
    """The ``model.lora`` node. ``target_modules`` default: peft's choice for the LLM's model type (``q_proj``,
    ``v_proj`` for OPT/Llama; ``q``, ``v`` for T5) and ``query``/``value`` for the Q-Former."""

    target: str | list[str] = "llm"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    targets: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.targets = (self.target,) if isinstance(self.target, str) else tuple(self.target)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"model.lora.target must be one of {TARGETS} or a list of them; got {self.target!r}")
        if int(self.r) < 1 or float(self.alpha) <= 0 or not 0 <= float(self.dropout) < 1:
            raise ValueError(f"model.lora: r >= 1, alpha > 0, 0 <= dropout < 1 expected; got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> "LoraSettings | None":
        if not node:
            return None
        known = {"target", "r", "alpha", "dropout", "target_modules"}
        unknown = set(node) - known
        if unknown:
            raise KeyError(f"model.lora: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**dict(node))


def _inject(module: nn.Module, settings: LoraSettings, target_modules: list[str]) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model  # peft: optional (the lora extra), seconds to import
    except ImportError as err:
        raise ImportError("model.lora needs the peft package: pip install peft (or the 'lora' extra)") from err
    config = LoraConfig(r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
                        target_modules=list(target_modules), bias="none")
    inject_adapter_in_model(config, module)


def _llm_target_modules(llm: nn.Module, settings: LoraSettings) -> list[str]:
    if settings.target_modules:
        return list(settings.target_modules)
    # peft: optional (lora extra)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(llm.config, "model_type", None)
    if model_type not in DEFAULTS:
        raise ValueError(f"model.lora: no default LoRA modules for LLM type {model_type!r}; set "
                         "model.lora.target_modules (names of its attention projections)")
    return list(DEFAULTS[model_type])


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject the adapters into ``model`` (a stage-2 BLIP-2); returns the names of the new trainable tensors."""
    if "llm" in settings.targets:
        llm = model.llm
        if getattr(llm, "quantization", None):
            raise ValueError("model.lora on the LLM with llm_kwargs.quantization is not supported; use one of them")
        _inject(llm.model, settings, _llm_target_modules(llm.model, settings))
    if "qformer" in settings.targets:
        model.Qformer.requires_grad_(False)  # only its adapters train
        _inject(model.Qformer, settings, list(settings.target_modules or QFORMER_MODULES))
        model.qformer_adapted = True  # checkpoints then hold its adapters only (see _missing_key_is_expected)
    added = [n for n, _ in model.named_parameters() if ".lora_" in n]  # (adapted layers' own weights: base_layer.*)
    if not added:
        raise ValueError(f"model.lora matched no module (target_modules={settings.target_modules})")
    for name, param in model.named_parameters():
        if name in added:
            param.requires_grad_(True)
    return added


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer  # peft: optional (the lora extra)

    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back (for export); returns how many."""
    try:
        from peft.tuners.lora import LoraLayer  # peft: optional (the lora extra)
    except ImportError:
        return 0
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.get_base_layer())
    return len(adapted)
