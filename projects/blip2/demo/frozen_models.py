"""Models that pre-train the parts BLIP-2 later freezes: a small image encoder and a small LLM.

As in the paper, the image encoder and the LLM exist before BLIP-2 and are frozen during it.
For the offline demo we train tiny ones here and export them in the formats real weights come
in, so BLIP-2 then loads them through the same plugins as real encoders and LLMs:

- ``frozen_image_encoder_pretrain``: any timm model (a ViT, or a CNN whose feature map is the patch
  grid) plus light heads that predict, for every patch,
  the shape, colour and size of the object under it (colour: 0 = background; shape and size are
  learnt on object patches only, which are a minority). Dense labels make each patch token say what is there, so
  the Q-Former can bind colours to shapes. ``export(dir)`` writes timm's ``config.json`` +
  ``model.safetensors`` (load with ``timm.create_model("local-dir:<dir>")``).
- ``frozen_lm_pretrain``: a Hugging Face causal LM (OPT by default) built from a config, with a
  tokenizer given by path, trained with next-token loss on text. ``export(dir)`` writes
  ``save_pretrained`` files for model and tokenizer.
- ``frozen_seq2seq_lm_pretrain``: the same for an encoder-decoder LM (T5 by default): the encoder reads
  ``text_input``, the decoder learns ``text_output``, as BLIP-2's Flan-T5 variant later uses it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import registry

__all__ = ["ImageEncoderPretrainer", "CausalLMPretrainer", "Seq2SeqLMPretrainer"]


class _PretrainBase(nn.Module):
    """The small part of the BaseModel contract these models need (all parameters train)."""

    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor (all parameters train), contiguous as safetensors needs (CNN weights are channels-last)."""
        return {k: v.contiguous() for k, v in self.state_dict().items()}

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint written by the runner (``{"model": state_dict}``) or a bare state dict."""
        path = str(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"checkpoint {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")

    def get_optimizer_params(self, weight_decay: float, lr_scale: float = 1.0) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]


@registry.models.register("frozen_image_encoder_pretrain")
class ImageEncoderPretrainer(_PretrainBase):
    """timm ViT or CNN + per-patch attribute heads. Expects ``samples["image"]`` [B,3,S,S] and
    ``samples["patch_labels"]`` [B,P,3] (shape, colour, size class per patch; 0 = background).

    Only per-patch heads: image-level heads (object count, background) on pooled features were tried and
    slowed the shape head badly (shape loss 1.24 vs 0.59 after 250 steps; the count is read off the patches).
    """


    def __init__(self, timm_name: str, timm_kwargs: dict[str, Any], num_shapes: int, num_colours: int,
                 num_sizes: int) -> None:
        super().__init__()
        import timm

        self.timm_name, self.timm_kwargs = timm_name, dict(timm_kwargs)
        self.encoder = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="",
                                         **self.timm_kwargs)
        width = self.encoder.num_features
        self.num_prefix = getattr(self.encoder, "num_prefix_tokens", 0)  # ViT class token; CNNs have none
        self.is_cnn = not hasattr(self.encoder, "patch_embed")
        if self.is_cnn:  # channels-last convolutions: 1.5x faster training steps on CPU (measured, batch 64)
            self.encoder.to(memory_format=torch.channels_last)
        self.patch_heads = nn.ModuleList(nn.Linear(width, n + 1) for n in (num_shapes, num_colours, num_sizes))

    @classmethod
    def from_config(cls, cfg: Any) -> "ImageEncoderPretrainer":
        from models.blip2_base import to_plain

        # plain lists, not ListConfig: timm splits tensors by them
        return cls(cfg.timm_name, to_plain(cfg.get("timm_kwargs")), cfg.num_shapes, cfg.num_colours, cfg.num_sizes)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, P, W]: a ViT's tokens without its class token, or a CNN's feature map as tokens."""
        if self.is_cnn:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.encoder.forward_features(images)  # ViT [B, prefix + P, W]; CNN [B, W, h, w]
        if features.ndim == 4:
            return features.flatten(2).transpose(1, 2)  # [B, h*w, W]
        return features[:, self.num_prefix:]

    def forward(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        patches = self.patch_tokens(samples["image"])
        labels = samples["patch_labels"]  # [B, P, 3]
        if patches.shape[1] != labels.shape[1]:
            raise ValueError(f"the encoder gives {patches.shape[1]} patch tokens but the data set has labels for "
                             f"{labels.shape[1]} patches: set the shapes_scenes patch_size to the encoder's stride")
        losses = {}
        foreground = labels[..., 0] > 0  # [B, P]
        for i, (name, head) in enumerate(zip(("shape", "colour", "size"), self.patch_heads)):
            logits = head(patches).float()  # [B, P, n + 1]
            target = labels[..., i]
            if name != "colour":  # colour also segments object/background; shape and size learn on objects only
                target = target.masked_fill(~foreground, -100)  # (most patches are background)
            losses[f"loss_{name}"] = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def patch_accuracy(self, samples: dict[str, Any]) -> dict[str, float]:
        """Per-attribute accuracy over object-covered patches (background patches excluded)."""
        patches = self.patch_tokens(samples["image"])
        labels = samples["patch_labels"]
        fg = labels[..., 0] > 0
        out = {}
        for i, (name, head) in enumerate(zip(("shape", "colour", "size"), self.patch_heads)):
            pred = head(patches).argmax(-1)
            out[f"{name}_acc"] = (pred == labels[..., i])[fg].float().mean().item()
        return out

    def export(self, out_dir: str | Path) -> Path:
        """Write the encoder (without heads) the way timm publishes weights: config.json + model.safetensors."""
        from timm.models import save_for_hf

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        save_for_hf(self.encoder, out, model_args=self.timm_kwargs, safe_serialization=True)
        return out


@registry.models.register("frozen_lm_pretrain")
class CausalLMPretrainer(_PretrainBase):
    """A Hugging Face causal LM trained from scratch on ``samples["text_input"]`` (list[str]).

    ``tokenizer`` is a directory with a saved tokenizer; ``lm_config`` holds the Hugging Face
    config fields (``model_type`` selects the architecture, e.g. ``opt``). Text matched by ``prompt_regex``
    is context, not a target: its tokens get no loss (instruction tuning's loss on responses only). The demo
    masks the "Question: ... Short answer:" of its question lines: the evaluation gives that prompt, so the LLM
    need not write it; an LLM that had learnt to write questions would offer them as captions, and beam search
    prefers them to a caption (their template tokens are near-certain).
    """

    default_model_type = "opt"
    auto_class = "AutoModelForCausalLM"
    #: config field -> the tokenizer attribute it is taken from (unless lm_config sets it)
    token_ids = {"pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}

    def __init__(self, tokenizer: str, lm_config: dict[str, Any], max_txt_len: int = 64,
                 prompt_regex: str | None = None) -> None:
        super().__init__()
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
        fields = dict(lm_config)
        model_type = fields.pop("model_type", self.default_model_type)
        fields.setdefault("vocab_size", len(self.tokenizer))
        for field, attribute in self.token_ids.items():
            fields.setdefault(field, getattr(self.tokenizer, attribute))
        config = transformers.AutoConfig.for_model(model_type, **fields)
        self.lm = getattr(transformers, self.auto_class).from_config(config)
        self._after_build()
        self.max_txt_len = max_txt_len
        try:
            self.prompt_regex = re.compile(prompt_regex) if prompt_regex else None
        except re.error as err:
            raise ValueError(f"model.prompt_regex {prompt_regex!r} is not a regular expression: {err}") from None

    def _after_build(self) -> None:
        """Hook for architecture-specific fixes right after construction."""

    @classmethod
    def from_config(cls, cfg: Any) -> "CausalLMPretrainer":
        return cls(cfg.tokenizer, dict(cfg.lm_config), cfg.get("max_txt_len", 64), cfg.get("prompt_regex"))

    def prompt_mask(self, texts: list[str], offsets: torch.Tensor) -> torch.Tensor:
        """[B, T] True where a token starts inside a ``prompt_regex`` match; ``offsets`` [B, T, 2] are the
        tokens' character spans (special tokens: (0, 0), never masked)."""
        mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
        starts, ends = offsets[..., 0], offsets[..., 1]
        for i, text in enumerate(texts):
            for match in self.prompt_regex.finditer(text):
                mask[i] |= (starts[i] >= match.start()) & (starts[i] < match.end()) & (ends[i] > starts[i])
        return mask

    def forward(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        device = next(self.parameters()).device
        texts = list(samples["text_input"])
        masked = self.prompt_regex is not None  # token offsets (a fast tokenizer) only when asked for
        enc = self.tokenizer(texts, return_tensors="pt", padding="longest", truncation=True,
                             max_length=self.max_txt_len, return_offsets_mapping=masked)
        no_loss = enc.attention_mask == 0
        if masked:
            no_loss |= self.prompt_mask(texts, enc.pop("offset_mapping"))
        enc = enc.to(device)
        labels = enc.input_ids.masked_fill(no_loss.to(device), -100)  # [B, T]
        out = self.lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
        return {"loss": out.loss}

    def export(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` model and tokenizer (loadable by ``AutoModelForCausalLM`` / the LLM adapters)."""
        out = Path(out_dir)
        self.lm.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out


@registry.models.register("frozen_seq2seq_lm_pretrain")
class Seq2SeqLMPretrainer(CausalLMPretrainer):
    """A Hugging Face encoder-decoder LM (T5 by default) trained from scratch: the encoder reads
    ``samples["text_input"]``, the decoder learns ``samples["text_output"]`` (teacher forcing).

    The decoder starts from the pad token, as T5's does; ``lm_config`` holds the Hugging Face config fields.
    """

    default_model_type = "t5"
    auto_class = "AutoModelForSeq2SeqLM"
    token_ids = {"pad_token_id": "pad_token_id", "eos_token_id": "eos_token_id",
                 "decoder_start_token_id": "pad_token_id"}

    def _after_build(self) -> None:
        # An untied config (Flan-T5's layout) gets its own lm_head: transformers 5 ties T5 weights on construction
        # (config.tie_word_embeddings reads True; the request survives as scale_decoder_outputs=False), and an
        # untied head initialised like the embeddings (std 1) would start with logits ~sqrt(d_model) too large.
        config = self.lm.config
        if not getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)):
            from models.llms import untie_lm_head

            untie_lm_head(self.lm)
            width = getattr(self.lm.config, "d_model", None) or self.lm.config.hidden_size
            nn.init.normal_(self.lm.get_output_embeddings().weight, std=width ** -0.5)

    def forward(self, samples: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "text_output" not in samples:
            raise KeyError("frozen_seq2seq_lm_pretrain needs samples['text_output'] (the decoder targets); "
                           "for datasets.shapes_text set text_format: seq2seq")
        device = next(self.parameters()).device
        kwargs = dict(return_tensors="pt", padding="longest", truncation=True, max_length=self.max_txt_len)
        source = self.tokenizer(list(samples["text_input"]), **kwargs).to(device)   # [B, T_in], eos-terminated
        target = self.tokenizer(list(samples["text_output"]), **kwargs).to(device)  # [B, T_out]
        labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
        out = self.lm(input_ids=source.input_ids, attention_mask=source.attention_mask, labels=labels,
                      decoder_attention_mask=target.attention_mask)
        return {"loss": out.loss}


def train_shapes_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512,
                           style: str = "opt") -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it with ``save_pretrained``.

    ``style="opt"``, like OPT's: ``</s>`` is both bos (prepended to every text) and eos, ``<pad>`` pads on
    the right, and "\\n" (which BLIP-2's OPT model uses to stop generating) is one token. ``style="t5"``, like
    T5's: no bos, ``</s>`` appended to every text (generation stops there).
    """
    if style not in ("opt", "t5"):
        raise ValueError(f"tokenizer style must be 'opt' or 't5', got {style!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos = eos 2
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos = tok.token_to_id("</s>")
    if style == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                           special_tokens=[("</s>", eos)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>" if style == "opt" else None,
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right")
    out = Path(out_dir)
    fast.save_pretrained(out)
    (out / "corpus_stats.json").write_text(json.dumps({"texts": len(texts), "vocab_size": len(fast)}))
    return out
