"""``BaseModel``: what every registered model shares (zoo configs, building, checkpoints, optimizer groups)."""
from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from common.device import module_device
from models.checkpoints import iter_state_dict_any

logger = logging.getLogger(__name__)

_MODELS_DIR = os.path.dirname(os.path.abspath(__file__))

#: ``model:`` keys every model accepts: which registered class and zoo type, and which zoo checkpoint to load.
GENERIC_MODEL_KEYS = ("arch", "model_type", "load_pretrained", "load_finetuned", "pretrained", "finetuned")


# -- config keys from signatures ------------------------------------------------------------------------------------
def parameter_names(fn: Callable) -> list[str]:
    """Named parameters of ``fn`` (positional-or-keyword and keyword-only; no ``self``, ``*args``, ``**kwargs``)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "cls")]


def init_parameters(cls: type) -> list[str]:
    """Constructor parameters of ``cls``, and of the bases its ``__init__`` forwards ``**kwargs`` to."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass in (nn.Module, object):
            break
        names += [name for name in parameter_names(init) if name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return names


def plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts / lists (what constructors expect); anything else unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def config_kwargs(cfg: Mapping[str, Any], names: list[str], aliases: Mapping[str, str] | None = None) -> dict:
    """The parameters among ``names`` that ``cfg`` sets (under their own name or a config alias ``key -> name``).

    Parameters ``cfg`` does not set are left out, so the signature's default applies: a default lives only there.
    """
    by_name = {name: name for name in names}
    by_name.update({key: name for key, name in (aliases or {}).items() if name in names})
    return {name: plain(cfg[key]) for key, name in by_name.items() if key in cfg}


def model_config_keys(cls: type) -> frozenset[str]:
    """The ``model:`` keys a registered model class accepts (``BaseModel.config_keys``; for any other class its
    constructor's parameters, plus the ``EXTRA_CONFIG_KEYS`` its ``from_config`` reads itself)."""
    if hasattr(cls, "config_keys"):
        return cls.config_keys()
    return frozenset(GENERIC_MODEL_KEYS) | set(init_parameters(cls)) | set(getattr(cls, "EXTRA_CONFIG_KEYS", ()))


class BaseModel(nn.Module):
    """Base class of every model in the zoo.

    Subclasses set ``PRETRAINED_MODEL_CONFIG_DICT = {model_type: "configs/<file>.yaml"}`` (relative to ``models/``)
    and implement ``from_config(cfg)``.
    """

    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}
    #: ``model:`` keys that name a constructor parameter another way (LAVIS spellings): ``{config key: parameter}``
    CONFIG_ALIASES: ClassVar[dict[str, str]] = {}
    #: keys ``from_config`` reads itself (no constructor parameter holds them), e.g. where the weights come from
    EXTRA_CONFIG_KEYS: ClassVar[tuple[str, ...]] = ()
    #: constructor parameters that ``from_config`` computes and a config may not set
    CONSTRUCTOR_ONLY: ClassVar[tuple[str, ...]] = ()

    # -- configs and building ---------------------------------------------------------------------------------------
    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        """Absolute path of the zoo YAML for ``model_type``; unknown types raise naming the valid ones."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise KeyError(
                f"{cls.__name__} has no model_type '{model_type}'. "
                f"Valid types: {', '.join(sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)) or '(none)'}"
            )
        path = cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]
        return path if os.path.isabs(path) else os.path.join(_MODELS_DIR, path)

    @classmethod
    def load_zoo_config(cls, model_type: str) -> DictConfig:
        """The ``model:`` node of the zoo YAML for ``model_type``."""
        path = cls.default_config_path(model_type)
        cfg = OmegaConf.load(path)
        if "model" not in cfg:
            raise KeyError(f"{path}: expected a top-level 'model:' node")
        return cfg.model

    @classmethod
    def from_pretrained(cls, model_type: str, **overrides: Any) -> "BaseModel":
        """Build the zoo model ``model_type`` (its YAML's ``model:`` node, then ``overrides``) with its weights."""
        cfg = cls.load_zoo_config(model_type)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> "BaseModel":
        raise NotImplementedError(f"{cls.__name__} must implement from_config(cfg)")

    @classmethod
    def config_parameters(cls) -> list[str]:
        """The parameters a ``model:`` config may set: the constructor's (see ``init_parameters``), minus
        ``CONSTRUCTOR_ONLY``. Subclasses whose config also feeds a builder method add that method's."""
        return [name for name in init_parameters(cls) if name not in cls.CONSTRUCTOR_ONLY]

    @classmethod
    def config_aliases(cls) -> dict[str, str]:
        return dict(cls.CONFIG_ALIASES)

    @classmethod
    def config_keys(cls) -> frozenset[str]:
        """Every valid ``model:`` key, derived from signatures: config validation and the contract tests use it."""
        aliases = cls.config_aliases()
        params = set(cls.config_parameters()) - set(aliases.values())
        return frozenset(GENERIC_MODEL_KEYS) | params | set(aliases) | set(cls.EXTRA_CONFIG_KEYS)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def frozen_module_prefixes(self) -> list[str]:
        """State-dict prefixes of frozen parts that checkpoints never hold (e.g. ``visual_encoder.``)."""
        prefixes = []
        for name, module in self.named_children():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                prefixes.append(f"{name}.")
        return prefixes

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters with ``requires_grad`` plus the buffers of non-frozen modules (what checkpoints store)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        frozen = tuple(self.frozen_module_prefixes())
        buffers = {n for n, _ in self.named_buffers() if not n.startswith(frozen)}
        return {k: v for k, v in self.state_dict().items() if k in trainable or k in buffers}

    checkpoint_piece_size = 64  # tensors read and loaded at a time by load_checkpoint

    def load_checkpoint(self, path_or_url: str, strict: bool = True) -> dict[str, list[str]]:
        """Load weights from a LAVIS .pth, a Hugging Face BLIP-2 checkpoint or ours (format detected by
        ``models.checkpoints``). Keys missing from the file must belong to frozen parts or to parts the file's
        format never holds; anything else raises (``strict``) or is logged. The file is read and loaded a piece at
        a time: peak memory is the model plus one piece, not the model plus a second copy of its weights."""
        missing: set[str] | None = None
        unexpected: list[str] = []
        count = 0
        for piece in self._state_dict_pieces(path_or_url):
            result = self.load_state_dict(piece, strict=False)
            # a key is missing when no piece brought it
            missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
            unexpected += result.unexpected_keys
            count += len(piece)
        own = list(self.state_dict())
        missing = set(own) if missing is None else missing  # an empty checkpoint brings nothing
        missing_keys = [k for k in own if k in missing and not self._missing_key_is_expected(k)]
        unexpected = [k for k in unexpected if not self._unexpected_key_is_expected(k)]
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        message = (
            f"checkpoint {path_or_url}: {len(missing_keys)} missing keys {missing_keys[:10]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:10]}"
        )
        if (missing_keys or unexpected) and strict:
            raise KeyError(message + " (pass strict=False to load anyway)")
        if missing_keys or unexpected:
            logger.warning(message)
        logger.info("loaded %d tensors from %s", count, path_or_url)
        return {"missing_keys": missing_keys, "unexpected_keys": unexpected}

    def _state_dict_pieces(self, path_or_url: str) -> Iterator[dict[str, torch.Tensor]]:
        """The checkpoint in our names, a few tensors at a time (``models.checkpoints.iter_state_dict_any``)."""
        return iter_state_dict_any(path_or_url, model=self, piece_size=self.checkpoint_piece_size)

    def _missing_key_is_expected(self, key: str) -> bool:
        """Frozen parts are not in checkpoints; subclasses may widen this (e.g. LLM keys)."""
        return key.startswith(tuple(self.frozen_module_prefixes()))

    def _unexpected_key_is_expected(self, key: str) -> bool:
        return False

    # -- optimisation ------------------------------------------------------------------------------------------------
    def vision_layer_id(self, name: str) -> int | None:
        """Layer index of a trainable image-encoder parameter for layer-wise LR decay, or None if not in the ViT."""
        return None

    def num_vision_layers(self) -> int:
        return 0

    def get_optimizer_params(
        self, weight_decay: float, lr_scale: float = 1.0, lr_layer_decay: float | None = None
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups over trainable parameters only.

        No weight decay for biases, norms and any 1-d parameter (and ``temp``/``query_tokens``-like scalars).
        Trainable ViT parameters get ``lr_scale = decay ** (L + 1 - layer_id)`` (layer-wise LR decay); the runner
        multiplies each group's LR by its ``lr_scale``. ``lr_layer_decay`` is an alias of ``lr_scale``.
        """
        decay_rate = lr_layer_decay if lr_layer_decay is not None else lr_scale
        num_layers = self.num_vision_layers()
        groups: dict[tuple[bool, float], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim <= 1 or name.endswith(".bias")  # biases, norms, temperature
            layer_id = self.vision_layer_id(name)
            scale = 1.0 if layer_id is None else decay_rate ** (num_layers + 1 - layer_id)
            key = (no_decay, scale)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "param_names": [],
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": scale,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        return list(groups.values())

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (works on the meta device)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total}

    def parameter_report(self) -> str:
        counts = self.parameter_counts()
        return (
            f"{type(self).__name__}: {counts['trainable'] / 1e6:.2f}M trainable / "
            f"{counts['total'] / 1e6:.2f}M total parameters"
        )


_BLOCK_RE = re.compile(r"\.(?:blocks|layers|resblocks|layer)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """Index N of ``...blocks.N.`` / ``layers.N.`` / ``resblocks.N.`` in a parameter name, else None."""
    match = _BLOCK_RE.search(f".{name}")
    return int(match.group(1)) if match else None
