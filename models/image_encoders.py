"""Frozen image encoders for BLIP-2: EVA-CLIP ViT-g/14, OpenAI CLIP ViT-L/14 and any timm model.

Every encoder returns all tokens of the last block it keeps, ``[B, 1 + (S/p)^2, num_features]`` for ViTs,
*without* a final LayerNorm: BLIP-2 applies its own ``ln_vision`` (owned by the BLIP-2 model) on top.
BLIP-2 drops the end of each original network: ``depth=39`` for EVA ViT-g (40 blocks, the penultimate block's
output) and ``depth=21`` for CLIP ViT-L (24 blocks), as the released code builds it (LAVIS 1.0.2
``create_clip_vit_L``: ``layers=22`` and ``Transformer(width, layers - 1, heads)``) and the released ViT-L
checkpoints were trained; ``depth=23`` (the paper's "second last layer") is an option.

ViT-style timm models are *adopted*: their patch embedding, class token, position embedding and blocks become
direct children of the encoder, so parameter names equal timm's (``blocks.3.attn.qkv.weight``), which for EVA are
also the names of LAVIS's ``eva_vit_g.pth``. Other timm models (CNNs, Swin, ...) are kept whole as ``trunk`` and
their ``forward_features`` map is flattened to tokens. Key conversions from other layouts (OpenAI CLIP, Hugging Face
``vision_model.*``) live in ``models/checkpoints/vision_keys.py``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import registry
from common.precision import compute_dtype, cpu_safe_, resolve_precision
from models.assets import resolve_asset
from models.checkpoints.sources import read_state_dict
from models.checkpoints.vision_keys import is_vision_key, vision_state_dict_to_timm, visual_encoder_part
from models.key_maps import KeyMap

logger = logging.getLogger(__name__)

LAVIS_URL_ROOT = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
EVA_VIT_G_URL = f"{LAVIS_URL_ROOT}/eva_vit_g.pth"
CLIP_VIT_L_URL = f"{LAVIS_URL_ROOT}/clip_vit_L.pth"


def precision_to_dtype(precision: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` (or a dtype) -> the dtype the weights are built in (``common.precision``'s rule:
    fp16 without CUDA becomes fp32)."""
    if isinstance(precision, torch.dtype):
        return compute_dtype(precision, torch.cuda.is_available(), "image encoder precision")
    return resolve_precision(precision, what="image encoder precision")


def _is_plain_vit(net: nn.Module) -> bool:
    """True for timm ViT/EVA models whose token pipeline is: patches -> [CLS; patches] + pos_embed -> blocks."""
    return (
        isinstance(getattr(net, "patch_embed", None), nn.Module)
        and isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList)
        and getattr(net, "cls_token", None) is not None
        and getattr(net, "pos_embed", None) is not None
        and getattr(net, "reg_token", None) is None
        and getattr(net, "rope", None) is None
        and not getattr(net, "no_embed_class", False)
        and getattr(net, "num_prefix_tokens", 1) == 1
    )


def _timm_export_args(pretrained: Any) -> dict[str, Any]:
    """``architecture`` and constructor ``model_args`` of a local timm export (``config.json`` written by
    ``timm.models.save_for_hf``), so that a config naming such a directory need not repeat its sizes; {} otherwise."""
    if not isinstance(pretrained, (str, Path)) or not (Path(pretrained) / "config.json").is_file():
        return {}
    path = Path(pretrained) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"image encoder: {path} is not valid JSON ({err})") from err
    if not isinstance(saved, dict) or "architecture" not in saved:
        return {}  # not a timm export (e.g. a Hugging Face vision config): nothing to read
    args = {k: v for k, v in dict(saved.get("model_args") or {}).items() if k not in ("num_classes", "global_pool")}
    return {"architecture": saved["architecture"], "model_args": args}


def _create_timm(model_name: str, image_size: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that passes ``img_size`` only to models that take it (CNNs do not)."""
    import timm  # imported on first build: keeps ``import models`` light

    try:
        return timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(model_name, **kwargs)


def grid_position_channels(height: int, width: int, channels: int) -> torch.Tensor:
    """[height*width, channels] fixed sin-cos features of each cell's row and column (channels/4 frequencies each)."""
    freqs = torch.arange(1, channels // 4 + 1, dtype=torch.float32) * math.pi  # [F]
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    row_angles = (rows[:, None] * freqs)[:, None, :].expand(height, width, -1)  # [h, w, F]
    col_angles = (cols[:, None] * freqs)[None, :, :].expand(height, width, -1)  # [h, w, F]
    grid = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=-1)
    return grid.reshape(height * width, channels)


class TimmImageEncoder(nn.Module):
    """Any timm model as a (by default frozen) BLIP-2 image encoder.

    Args:
        image_size: input resolution S; the position embedding is built (and loaded weights resampled) for it.
        precision: ``fp32 | bf16 | fp16`` weight and compute dtype; fp16 is refused on CPU at forward time.
        freeze: parameters get ``requires_grad=False`` and the module stays in eval mode under ``.train()``.
        grad_checkpointing: activation checkpointing per block (only matters when not frozen).
        drop_path_rate: stochastic depth (linearly increasing over blocks, as in EVA/timm).
        pretrained: ``None`` (random init, e.g. when a full checkpoint is loaded next), ``"timm"`` (timm's own
            pretrained weights), or a path / URL / hub id of a checkpoint in any supported layout.
        model_name: the timm model name; subclasses fix it.
        final_norm: keep the timm model's final norm (BLIP-2 does not: ``ln_vision`` follows).
        position_channels: for a feature-map model (CNN), append this many fixed 2-D sin-cos position channels to
            every token, so the Q-Former knows where each token is (a ViT's tokens carry a position embedding).
        feature_index: for a feature-map model, take the map of this stage (an index into timm's ``feature_info``,
            as timm's ``out_indices``: for EfficientNet 3 is the stride-16 map) instead of the final one; the later
            stages and the head are pruned after the weights are loaded.
        key_map: the checkpoint's key layout when it is not timm's: a declared map's name (``models/key_maps.py``,
            e.g. ``efficientnet_pytorch``) or ``{rules: [[regex, replacement], ...], flat_blocks: prefix}``.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``embed_dim``, ``depth``, ``num_heads`` for tiny models).
    """

    default_model_name: str | None = None
    default_timm_kwargs: dict[str, Any] = {}
    # LAVIS resamples EVA position embeddings with align_corners=False and CLIP ones with align_corners=True.
    pos_embed_align_corners: bool = False

    def __init__(
        self,
        image_size: int = 224,
        precision: str = "fp32",
        freeze: bool = True,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        pretrained: str | Path | None = None,
        model_name: str | None = None,
        final_norm: bool = False,
        position_channels: int = 0,
        feature_index: int | None = None,
        key_map: Any = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        pretrained = resolve_asset(pretrained) if isinstance(pretrained, str) else pretrained
        self.key_map = KeyMap.parse(key_map) if key_map is not None else None
        saved = _timm_export_args(pretrained)
        model_name = model_name or saved.get("architecture") or self.default_model_name
        if saved and saved.get("architecture") not in (None, model_name):
            raise ValueError(f"image encoder: {pretrained}/config.json is a timm '{saved['architecture']}', "
                             f"but the config asks for model_name={model_name!r}")
        if not model_name:
            raise ValueError("the 'timm' image encoder needs model_name=<a timm model name>, e.g. 'vit_base_patch16_224'")
        dtype = precision_to_dtype(precision)
        kwargs = {**self.default_timm_kwargs, **saved.get("model_args", {}), **timm_kwargs}
        net = _create_timm(
            model_name,
            image_size,
            pretrained=pretrained == "timm",
            num_classes=0,
            global_pool="",
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self.model_name = model_name
        self.image_size = image_size
        self.num_features: int = int(net.num_features)
        self.is_vit = _is_plain_vit(net)
        if self.is_vit:
            # Adopt the token pipeline so parameter names equal timm's (and LAVIS's for EVA).
            self.patch_embed = net.patch_embed
            self.patch_embed.strict_img_size = False  # other sizes work via pos-embed resampling
            self.cls_token = net.cls_token
            self.pos_embed = net.pos_embed
            self.pos_drop = net.pos_drop
            self.norm_pre = net.norm_pre
            self.blocks = net.blocks
            self.norm = net.norm if final_norm else nn.Identity()
            self.patch_size = int(self.patch_embed.patch_size[0])
            self.register_load_state_dict_pre_hook(self._adapt_on_load)
        else:
            if not final_norm and isinstance(getattr(net, "norm", None), nn.Module):
                net.norm = nn.Identity()
            self.trunk = net
            self.patch_size = None
        self.feature_index = self._check_feature_index(feature_index, net)
        if self.feature_index is not None:
            self.num_features = int(net.feature_info[self.feature_index]["num_chs"])
        if position_channels and (self.is_vit or position_channels % 4):
            raise ValueError(f"image encoder: position_channels={position_channels}; expected a multiple of 4, and "
                             f"only for feature-map models ({model_name} is a ViT with its own position embedding)")
        self.position_channels = int(position_channels)
        self.num_features += self.position_channels
        self.grad_checkpointing = False
        self.set_grad_checkpointing(grad_checkpointing)

        if pretrained not in (None, "", "timm"):
            self.load_pretrained(pretrained)
        if self.feature_index is not None:  # after loading: the checkpoint holds the whole network
            self.trunk.prune_intermediate_layers([self.feature_index], prune_head=True)
        self.to(dtype)
        self.frozen = bool(freeze)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def _check_feature_index(self, feature_index: int | None, net: nn.Module) -> int | None:
        if feature_index is None:
            return None
        stages = getattr(net, "feature_info", None)
        if self.is_vit or not stages or not hasattr(net, "forward_intermediates") \
                or not hasattr(net, "prune_intermediate_layers"):
            raise ValueError(f"image encoder: feature_index={feature_index} needs a feature-map timm model with "
                             f"feature_info and forward_intermediates; {self.model_name} has not")
        if not 0 <= int(feature_index) < len(stages):
            maps = [f"{i}: {info['num_chs']} ch, stride {info['reduction']}" for i, info in enumerate(stages)]
            raise ValueError(f"image encoder: feature_index={feature_index} is out of range for {self.model_name}; "
                             f"its feature maps are {maps}")
        return int(feature_index)

    # -- mode, precision, checkpointing ------------------------------------------------------------
    def train(self, mode: bool = True) -> "TimmImageEncoder":
        """A frozen encoder ignores ``train(True)`` and stays in eval mode (dropout/drop-path off)."""
        return super().train(mode and not getattr(self, "frozen", False))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = bool(enable)
        if not self.is_vit and hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enable)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (for layer-wise learning-rate decay)."""
        return len(self.blocks) if self.is_vit else 1

    def layer_id(self, param_name: str) -> int:
        """Depth index of a parameter for layer-wise LR decay: embeddings 0, block i -> i + 1, the rest last."""
        if not self.is_vit:
            return 0
        if param_name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "norm_pre"):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.num_layers + 1

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> tokens [B, 1 + (S/p)^2, num_features] (ViT) or [B, h*w, C] (other models).

        Computes in the encoder's dtype and returns the tokens in the dtype of ``images``.
        """
        if images.ndim != 4:
            raise ValueError(f"image encoder expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.device.type == "cpu" and self.dtype == torch.float16:
            cpu_safe_(self, "image encoder")  # the precision rule: fp16 never computes on CPU
        weight_dtype = self.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = images.to(weight_dtype)
            tokens = self._forward_vit(x) if self.is_vit else self._forward_trunk(x)
        return tokens.to(images.dtype)

    def _forward_vit(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size} "
                f"({self.model_name})"
            )
        grid = (height // self.patch_size, width // self.patch_size)
        x = self.patch_embed(x)  # [B, h*w, W]
        pos_embed = self.pos_embed  # [1, 1 + h0*w0, W]
        if pos_embed.shape[1] != 1 + grid[0] * grid[1]:
            pos_embed = self._resample(pos_embed, grid)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + pos_embed  # [B, 1 + h*w, W]
        x = self.norm_pre(self.pos_drop(x))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return self.norm(x)

    def _forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_index is None:
            features = self.trunk.forward_features(x)
        else:
            features = self.trunk.forward_intermediates(x, indices=[self.feature_index], intermediates_only=True)[0]
        if features.ndim != 4:
            return features
        nhwc = getattr(self.trunk, "output_fmt", "NCHW") == "NHWC"
        height, width = features.shape[1:3] if nhwc else features.shape[2:4]
        tokens = features.flatten(1, 2) if nhwc else features.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self.position_channels:
            position = grid_position_channels(height, width, self.position_channels).to(tokens)  # [h*w, P]
            tokens = torch.cat([tokens, position.expand(tokens.shape[0], -1, -1)], dim=-1)  # [B, h*w, C + P]
        return tokens

    # -- position embeddings ------------------------------------------------------------------------
    def _resample(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bicubic resampling of [1, 1 + n, W] to [1, 1 + grid[0]*grid[1], W], keeping the CLS entry."""
        from timm.layers import resample_abs_pos_embed  # timm: imported on the first timm build, as in _create_timm

        return resample_abs_pos_embed(
            pos_embed,
            new_size=list(grid),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
            align_corners=self.pos_embed_align_corners,
        )

    def _adapt_on_load(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load-time hook: resample the position embedding of a checkpoint trained at another resolution, and
        convert between EVA's ``q_bias``/``v_bias`` and a full ``qkv.bias`` (the key bias is softmax-invariant)."""
        self._adapt_qkv_bias(state_dict, prefix)
        key = prefix + "pos_embed"
        loaded = state_dict.get(key)
        if loaded is None or loaded.shape == self.pos_embed.shape or self.pos_embed.is_meta:
            return
        if loaded.ndim == 2:
            loaded = loaded.unsqueeze(0)
        grid = self.patch_embed.grid_size
        old = int(round((loaded.shape[1] - 1) ** 0.5))
        logger.info("%s: position embedding interpolated from %dx%d to %dx%d", self.model_name, old, old, *grid)
        state_dict[key] = self._resample(loaded, tuple(grid))

    def _adapt_qkv_bias(self, state_dict: dict, prefix: str) -> None:
        has_full_bias = getattr(self.blocks[0].attn.qkv, "bias", None) is not None
        for index in range(len(self.blocks)):
            base = f"{prefix}blocks.{index}.attn."
            if has_full_bias and base + "q_bias" in state_dict and base + "qkv.bias" not in state_dict:
                q_bias, v_bias = state_dict.pop(base + "q_bias"), state_dict.pop(base + "v_bias")
                state_dict[base + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            elif not has_full_bias and hasattr(self.blocks[0].attn, "q_bias") and base + "qkv.bias" in state_dict:
                q_bias, _, v_bias = state_dict.pop(base + "qkv.bias").chunk(3)
                state_dict[base + "q_bias"], state_dict[base + "v_bias"] = q_bias, v_bias

    # -- weights ------------------------------------------------------------------------------------
    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Any supported layout (timm/LAVIS, Hugging Face ``vision_model.*``, OpenAI CLIP) -> this module's names."""
        if self.key_map is not None:
            blocks = self.blocks if self.is_vit else getattr(self.trunk, "blocks", None)
            depths = [len(stage) for stage in blocks] if blocks is not None and all(
                isinstance(stage, nn.Sequential) for stage in blocks) else None
            state_dict = self.key_map.apply(visual_encoder_part(state_dict), depths)
        if not self.is_vit:  # CNNs and other trunks: timm's own names, kept under ``trunk.``
            state_dict = {k if k.startswith("trunk.") else f"trunk.{k}": v
                          for k, v in visual_encoder_part(state_dict).items()}
            return self._without_removed_head(state_dict)
        return vision_state_dict_to_timm(state_dict, depth=self.num_layers)

    def _without_removed_head(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop the classifier of an ImageNet checkpoint: the encoder is built without it (``num_classes=0``)."""
        head = (getattr(self.trunk, "pretrained_cfg", None) or {}).get("classifier")
        if not head:
            return state_dict
        own = self.state_dict()
        prefix = f"trunk.{head}."
        return {k: v for k, v in state_dict.items() if not k.startswith(prefix) or k in own}

    def load_pretrained(self, source: str | Path | Mapping[str, torch.Tensor]) -> None:
        """Load weights from a path / URL / hub id or a state dict; every parameter must be covered."""
        name = source if not isinstance(source, Mapping) else "<state dict>"
        raw = read_state_dict(source, select=is_vision_key) if not isinstance(source, Mapping) else dict(source)
        state_dict = self.convert_state_dict(raw)
        result = self.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(
                f"image encoder {self.model_name}: weights from {name} do not match: "
                f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
                f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
            )
        logger.info("image encoder %s: loaded %d tensors from %s", self.model_name, len(state_dict), name)


@registry.image_encoders.register("timm")
class GenericTimmEncoder(TimmImageEncoder):
    """Any timm model by name (``model_name=...`` in the config); no code needed for a new backbone."""


@registry.image_encoders.register("eva_vit_g", "eva_clip_g")
class EvaViTG(TimmImageEncoder):
    """EVA-CLIP ViT-g/14 as in BLIP-2: width 1408, 16 heads, FFN 6144, 39 of 40 blocks, q/v bias, LN eps 1e-6.

    timm's ``eva_giant_patch14_224`` with ``depth=39`` has exactly LAVIS's ``eva_vit_g.pth`` parameter names.
    Pass ``pretrained=EVA_VIT_G_URL`` for the original weights (the zoo does this only when no full checkpoint
    with the ViT follows).
    """

    default_model_name = "eva_giant_patch14_224"
    default_timm_kwargs = {"depth": 39}
    pos_embed_align_corners = False


@registry.image_encoders.register("clip_vit_l", "clip_L")
class ClipViTL(TimmImageEncoder):
    """OpenAI CLIP ViT-L/14 as in BLIP-2: width 1024, the first 21 of 24 blocks, QuickGELU, ln_pre, no patch bias.

    21 blocks is what the released code builds and what the released ViT-L Q-Formers (``pretrain_vitL``,
    ``pretrain_flant5xl_vitL``) were trained on; ``depth=23`` (``vit_kwargs: {depth: 23}``) gives the paper's
    "second last layer" (later LAVIS versions), for Q-Formers trained that way.

    OpenAI/LAVIS names (``conv1``, ``transformer.resblocks.i.attn.in_proj_weight``, ...) are converted to timm's
    on load; pass ``pretrained=CLIP_VIT_L_URL`` for the original weights.
    """

    default_model_name = "vit_large_patch14_clip_quickgelu_224"
    default_timm_kwargs = {"depth": 21}
    pos_embed_align_corners = True
