"""Export our BLIP-2 models as Hugging Face checkpoints that ``transformers`` loads.

``export_to_hf(model, out_dir)`` writes ``config.json`` (a ``Blip2Config`` built from our model's parts),
``model.safetensors`` (names mapped by ``models.checkpoints.blip2_keys.ours_to_hf``), ``generation_config.json`` and, when the
LLM has a tokenizer, a ``Blip2Processor`` (tokenizer with an ``<image>`` token + BLIP image processor).
"""
from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models.checkpoints.blip2_keys import model_layout, ours_to_hf
from models.checkpoints.sources import StateDict
from models.instructblip_layout import blip2_to_instructblip
from models.lora import merge_lora

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"


def is_instruct(model: nn.Module) -> bool:
    """Whether ``model`` has InstructBLIP's instruction-aware Q-Former (exported as Hugging Face InstructBLIP)."""
    return bool(getattr(getattr(model, "Qformer", None), "instruction_aware", False))


def hf_blip2_config(model: nn.Module, image_token_index: int | None = None, video: bool = False) -> Any:
    """The ``transformers`` config describing ``model``: ``Blip2Config``, or for an instruction-aware Q-Former
    ``InstructBlipConfig`` (``InstructBlipVideoConfig`` when ``video``). EVA-style encoders only: HF's vision tower
    has no ln_pre/QuickGELU, so CLIP ViT-L models cannot be expressed."""
    # transformers' model/config modules: seconds to import, loaded on first use
    from transformers import Blip2Config, InstructBlipConfig, InstructBlipVideoConfig

    layout = model_layout(model)
    encoder = model.get_submodule(layout["vision"].rstrip("."))
    block = encoder.blocks[0] if getattr(encoder, "is_vit", False) else None
    if block is None or not _hf_expressible(encoder):
        raise ValueError(
            f"export to Hugging Face BLIP-2 needs an EVA-style image encoder (eva_vit_g, or a plain pre-norm timm ViT "
            f"with exact GELU, patch bias and no ln_pre); {type(encoder).__name__} "
            f"({getattr(encoder, 'model_name', '?')}) has no HF BLIP-2 equivalent"
        )
    ln_vision = model.ln_vision
    if abs(ln_vision.eps - block.norm1.eps) > 0:
        logger.warning("ln_vision eps %g differs from the ViT's %g; HF BLIP-2 uses one layer_norm_eps (%g) for both",
                       ln_vision.eps, block.norm1.eps, block.norm1.eps)
    vision = dict(
        hidden_size=encoder.num_features, intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(encoder.blocks), num_attention_heads=block.attn.num_heads,
        image_size=encoder.image_size, patch_size=encoder.patch_size, layer_norm_eps=block.norm1.eps,
        qkv_bias=hasattr(block.attn, "q_bias") or block.attn.qkv.bias is not None, hidden_act="gelu",
    )
    qformer = model.Qformer
    q = qformer.config
    qformer_cfg = dict(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size, hidden_act=q.hidden_act,
        hidden_dropout_prob=q.hidden_dropout_prob, attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        max_position_embeddings=q.max_position_embeddings, initializer_range=q.initializer_range,
        layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width, use_qformer_text_input=bool(qformer.has_text_input),
    )
    kwargs: dict[str, Any] = dict(vision_config=vision, qformer_config=qformer_cfg,
                                  num_query_tokens=int(model.query_tokens.shape[1]))
    if is_instruct(model):
        if not layout["llm"]:
            raise ValueError("an instruction-aware Q-Former exports only with an LLM (InstructBLIP)")
        del qformer_cfg["use_qformer_text_input"]
        llm_model = model.get_submodule(layout["llm"].rstrip("."))
        kwargs["text_config"] = llm_model.config.to_dict()
        kwargs["video_token_index" if video else "image_token_index"] = image_token_index
        kwargs["architectures"] = ["InstructBlipVideoForConditionalGeneration" if video
                                   else "InstructBlipForConditionalGeneration"]
        return (InstructBlipVideoConfig if video else InstructBlipConfig)(**kwargs)
    if video:
        raise ValueError("video export needs an InstructBLIP model (Hugging Face has no BLIP-2 video class)")
    if layout["llm"]:
        llm_model = model.get_submodule(layout["llm"].rstrip(".")) if layout["llm"].endswith(".model.") else None
        kwargs["text_config"] = llm_model.config.to_dict()
        kwargs["image_token_index"] = image_token_index
        kwargs["architectures"] = ["Blip2ForConditionalGeneration"]
    else:
        kwargs["image_text_hidden_size"] = int(model.vision_proj.out_features)
        kwargs["architectures"] = ["Blip2ForImageTextRetrieval"]
    return Blip2Config(**kwargs)


_HF_BLOCK_PARAMS = re.compile(
    r"^(norm[12]\.(weight|bias)|attn\.(qkv\.(weight|bias)|q_bias|v_bias|proj\.(weight|bias))|mlp\.fc[12]\.(weight|bias))$"
)


def _hf_expressible(encoder: nn.Module) -> bool:
    """True when every block is exactly HF's Blip2EncoderLayer: LayerNorms, qkv (+bias), projection, GELU MLP."""
    if not isinstance(encoder.norm_pre, nn.Identity) or encoder.patch_embed.proj.bias is None:
        return False
    for block in encoder.blocks:
        if not all(_HF_BLOCK_PARAMS.match(name) for name, _ in block.named_parameters()):
            return False
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            return False
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            return False
    return True


def _dedupe_shared(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Keep the first name of tensors that share storage (tied weights; transformers re-ties them on load)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: StateDict = {}
    for key, value in state_dict.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = value.detach().contiguous()
    return out


def export_to_hf(model: nn.Module, out_dir: str | os.PathLike, save_processor: bool = True, video: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer/processor when available) so that
    ``transformers`` loads ``model`` as ``Blip2ForConditionalGeneration`` (models with an LLM),
    ``Blip2ForImageTextRetrieval`` (stage 1) or, for InstructBLIP, ``InstructBlipForConditionalGeneration``
    (``InstructBlipVideoForConditionalGeneration`` when ``video``). The LLM tokenizer gets an ``<image>`` (``<video>``)
    token (transformers 5 needs ``num_query_tokens`` (times frames) of them in ``input_ids``); it takes a spare
    embedding row when the vocabulary has one (as OPT and Flan-T5 do), otherwise the embedding grows by a row that
    generation is told to suppress."""
    if merge_lora(model):  # LoRA adapters (models/lora.py) become part of the weights they adapt, in place
        logger.info("merged the LoRA adapters into the model's weights for export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = model_layout(model)
    state = ours_to_hf(model.state_dict(), layout)
    if is_instruct(model):
        state = blip2_to_instructblip(state)
    media_token = VIDEO_TOKEN if video else IMAGE_TOKEN
    if any(v.is_meta for v in state.values()):
        raise ValueError("cannot export a model on the meta device: load its weights first")
    image_token_index, tokenizer, suppress = None, None, []
    if layout["llm"]:
        adapter = model.get_submodule(layout["llm"].rstrip(".").removesuffix(".model"))
        llm_model = model.get_submodule(layout["llm"].rstrip("."))
        tokenizer = getattr(adapter, "tokenizer", None)
        rows = llm_model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None and media_token in tokenizer.get_vocab():
            image_token_index = tokenizer.convert_tokens_to_ids(media_token)
        else:
            if tokenizer is not None:
                tokenizer = _copy_tokenizer(tokenizer)
                tokenizer.add_special_tokens({"additional_special_tokens": [media_token]})
                image_token_index = tokenizer.convert_tokens_to_ids(media_token)
            else:
                image_token_index = rows
            if image_token_index >= rows:
                state = _grow_vocab(state, rows, image_token_index + 1)
                suppress = [image_token_index]
    config = hf_blip2_config(model, image_token_index, video=video)
    if suppress:
        config.text_config.vocab_size = image_token_index + 1
    save_file(_dedupe_shared(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if layout["llm"]:
        # transformers' model/config modules: seconds to import, loaded on first use
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(config.text_config)
        if suppress:
            gen.suppress_tokens = suppress
        gen.save_pretrained(out)
    if tokenizer is not None and save_processor:
        _save_processor(model, tokenizer, config, out, media_token)
    logger.info("exported %s to %s as %s", type(model).__name__, out, config.architectures[0])
    return out


def _copy_tokenizer(tokenizer: Any) -> Any:
    return copy.deepcopy(tokenizer)


def _grow_vocab(state: StateDict, rows: int, new_rows: int) -> StateDict:
    """Append rows (mean of the existing ones) to every LLM tensor indexed by the vocabulary."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("language_model.") and value.ndim == 2 and value.shape[0] == rows:
            extra = value.mean(0, keepdim=True).expand(new_rows - rows, -1)
            out[key] = torch.cat([value, extra.to(value.dtype)])
        elif key.startswith("language_model.") and key.endswith("final_logits_bias"):
            out[key] = torch.cat([value, value.new_zeros(*value.shape[:-1], new_rows - rows)], dim=-1)
    return out


def _save_processor(model: nn.Module, tokenizer: Any, config: Any, out: Path, media_token: str = IMAGE_TOKEN) -> None:
    """Tokenizer + BLIP image processor (bicubic resize, CLIP mean/std) as a ``Blip2Processor``; InstructBLIP adds
    the Q-Former's tokenizer (``InstructBlipProcessor``, saved under ``qformer_tokenizer/``)."""
    # transformers' model/config modules: seconds to import, loaded on first use
    from transformers import Blip2Processor, BlipImageProcessor

    size = config.vision_config.image_size
    image_processor = BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    tokenizer.image_token = IMAGE_TOKEN if not hasattr(tokenizer, "image_token") else tokenizer.image_token
    if is_instruct(model):
        model.tokenizer.save_pretrained(out / "qformer_tokenizer")  # where InstructBlipProcessor keeps it
        if media_token == VIDEO_TOKEN:  # the tokenizers only (a video processor needs its own frame settings)
            tokenizer.save_pretrained(out)
            return
    try:
        if is_instruct(model):
            # transformers' model/config modules: seconds to import, loaded on first use
            from transformers import InstructBlipProcessor

            InstructBlipProcessor(image_processor, tokenizer, model.tokenizer,
                                  num_query_tokens=config.num_query_tokens).save_pretrained(out)
            return
        Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens).save_pretrained(out)
    except Exception as err:  # noqa: BLE001 - the weights are written already; the processor is a convenience
        logger.warning("could not save a Blip2Processor to %s (%s); saving the tokenizer alone", out, err)
        tokenizer.save_pretrained(out)
