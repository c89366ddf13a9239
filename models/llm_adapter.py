"""The frozen-LLM adapter base: one small interface over Hugging Face causal and seq2seq language models.

BLIP-2 feeds the LLM a soft prompt (projected Q-Former queries) through ``inputs_embeds``. The adapters
(``FrozenLLM``, ``FrozenSeq2SeqLM``; the registered ones are in ``models/llms.py``) hide everything model-specific
behind the same methods, so ``blip2_opt`` works with any decoder-only adapter and ``blip2_t5`` with any
encoder-decoder adapter:

    llm = registry.llms.get("opt")("facebook/opt-2.7b")         # or a local dir
    embeds = llm.embed_tokens(ids)                              # [B, T, H] in the LLM dtype
    out = llm(inputs_embeds, attention_mask, labels=labels)     # LLMOutput(logits, loss, nll ...)
    new_ids = llm.generate(inputs_embeds, attention_mask, num_beams=5, max_new_tokens=30)

Frozen for real: ``requires_grad_(False)``, kept in eval mode by ``train()``, and the weights
are half precision on GPU by default (fp16 for OPT, bf16 otherwise) but never fp16 on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from common.paths import hub_offline
from common.precision import cpu_safe_, resolve_precision
from models.assets import resolve_asset
from models.gguf import gguf_checkpoint, resolve_gguf_path
from models.llm_output import LLMOutput, output_with_loss, scored_rows_nll, token_nll
from models.quantize import METHODS, bitsandbytes_config, quantize_linear_layers

logger = logging.getLogger(__name__)


def _building_on_meta() -> bool:
    """True inside ``with torch.device("meta"):`` (instantiate without weights)."""
    return torch.get_default_device().type == "meta"


SHIPPED_LLM_CONFIGS = Path(__file__).parent / "configs" / "llm"


def shipped_llm_config(name: str) -> dict[str, Any] | None:
    """The public ``config.json`` of a paper LLM shipped with the package (``configs/llm/<org>--<name>.json``:
    facebook/opt-2.7b, facebook/opt-6.7b, google/flan-t5-xl, google/flan-t5-xxl), or None. Used when the LLM is
    built without its weights (meta device), so that a paper-size skeleton needs no download."""
    path = SHIPPED_LLM_CONFIGS / (str(name).replace("/", "--") + ".json")
    if "/" not in str(name) or not path.is_file():
        return None
    return json.loads(path.read_text())


class FrozenLLM(nn.Module):
    """Base adapter around a Hugging Face ``PreTrainedModel`` (stored as ``self.model``)."""

    auto_model_name: ClassVar[str] = "AutoModelForCausalLM"
    gpu_precision: ClassVar[str] = "bf16"
    is_encoder_decoder: ClassVar[bool] = False

    def __init__(
        self,
        model_name_or_path: str,
        precision: str | None = "auto",
        freeze: bool = True,
        *,
        load_weights: bool = True,
        config: Any = None,
        config_overrides: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
        attn_implementation: str | None = "sdpa",
        stop_at_newline: bool | str = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        quantization: str | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
    ) -> None:
        """Load ``model_name_or_path`` (hub id, local dir, ``tiny:...``/``package:...`` name, or a ``.gguf`` file).

        ``gguf_file``: a GGUF file (path, or file name inside the directory ``model_name_or_path``); it is
        dequantised once and cached as a Hugging Face checkpoint with its tokenizer (``models/gguf.py``).
        ``load_weights=False`` (or building under ``torch.device("meta")``) instantiates from the
        config only: a full checkpoint is about to be loaded, or only shapes are needed.
        ``config`` overrides the config (a ``PretrainedConfig`` or a dict with ``model_type``);
        ``config_overrides`` sets single attributes of it before the model is built (e.g. LAVIS's Flan-T5
        ``dense_act_fn: gelu``); an attribute the config does not have is an error.
        ``quantization`` (``int8`` weight-only, ``int8_dynamic``) or ``load_in_8bit``/``load_in_4bit`` (bitsandbytes,
        CUDA): a quantised frozen LLM (``models/quantize.py``); applied once the weights are loaded.
        ``stop_at_newline``: ``true`` ends generation at the "\\n" token as well as at eos, and "\\n" closes a
        target (as BLIP-2's OPT does: the released code stops at that one token, so a "\\n\\n" token does not stop
        it); ``"any"`` also stops at every other token whose text holds a newline ("\\n\\n", "\\n   ", "\\r\\n" in a
        byte-level BPE vocabulary), so that an answer never runs past a line; ``false``: eos only.
        """
        if not (isinstance(stop_at_newline, bool) or stop_at_newline == "any"):
            raise ValueError(f"stop_at_newline={stop_at_newline!r}: expected true, false or 'any'")
        super().__init__()
        model_name_or_path = resolve_asset(str(model_name_or_path))  # "tiny:opt", "package:x/y" -> local path
        if gguf_file is None and model_name_or_path.endswith(".gguf") and os.path.isfile(model_name_or_path):
            gguf_file = model_name_or_path
        self.gguf_file = None
        if gguf_file is not None:
            self.gguf_file = str(resolve_gguf_path(resolve_asset(str(gguf_file)), model_name_or_path))
            model_name_or_path = str(gguf_checkpoint(self.gguf_file, self._auto_class().__name__))
        self.model_name_or_path = model_name_or_path
        self.tokenizer_name_or_path = resolve_asset(str(tokenizer_name_or_path or model_name_or_path))
        self.frozen = freeze
        self.stop_at_newline = stop_at_newline
        self._hub_kwargs = {
            k: v
            for k, v in dict(
                cache_dir=cache_dir, revision=revision, local_files_only=local_files_only,
                trust_remote_code=trust_remote_code or None,
            ).items()
            if v is not None
        }
        self._tokenizer = None
        self.quantization = quantization
        if quantization is not None:
            if quantization not in METHODS:
                raise ValueError(f"llm_kwargs.quantization must be one of {', '.join(METHODS)} or null; "
                                 f"got {quantization!r}")
            if not freeze:
                raise ValueError("llm_kwargs.quantization is for a frozen LLM (freeze=True)")
        self._bnb_kwargs = {}
        if load_in_8bit or load_in_4bit:
            self._bnb_kwargs = bitsandbytes_config(load_in_8bit, load_in_4bit)
        dtype = resolve_precision(precision, self.gpu_precision, what="LLM precision")
        load_weights = load_weights and not _building_on_meta()
        self._reads_weights = load_weights
        hf_config = self._load_config(config)
        for key, value in dict(config_overrides or {}).items():
            if not hasattr(hf_config, key):
                raise ValueError(f"llm_kwargs.config_overrides: {type(hf_config).__name__} of {model_name_or_path!r} "
                                 f"has no attribute {key!r}")
            setattr(hf_config, key, value)
        self.model = self._build_model(hf_config, dtype, load_weights, attn_implementation)
        self._after_build()
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        if not _building_on_meta() and self.device.type != "meta":
            self.apply_quantization()

    def apply_quantization(self) -> None:
        """Quantise the loaded LLM's linear layers as ``quantization`` asks (once; a no-op without it). An LLM built
        on the meta device calls this after a checkpoint brought its weights."""
        if self.quantization is not None and not getattr(self, "_quantized", False):
            count = quantize_linear_layers(self.model, self.quantization)
            self._quantized = True
            logger.info("quantised %d linear layers of %s (%s)", count, self.model_name_or_path, self.quantization)

    # -- construction ------------------------------------------------------------------------------
    def _auto_class(self):
        if self.gguf_file:  # the file names its architecture: build whatever it is (a Llama under the OPT adapter)
            return getattr(transformers, "AutoModelForSeq2SeqLM" if self.is_encoder_decoder else "AutoModelForCausalLM")
        return getattr(transformers, self.auto_model_name)

    def _load_config(self, config: Any):
        # transformers' model/config modules: seconds to import, loaded on first use
        from transformers import AutoConfig, PretrainedConfig

        if isinstance(config, PretrainedConfig):
            return config
        if config is not None:
            config = dict(config)
            if "model_type" not in config:
                raise ValueError(f"LLM config dict for {self.model_name_or_path!r} needs a 'model_type' key")
            return AutoConfig.for_model(**config)
        shipped = None if self._reads_weights else shipped_llm_config(self.model_name_or_path)
        if shipped is not None:  # no weights to read (meta device / a checkpoint brings them): nothing downloaded
            return AutoConfig.for_model(**shipped)
        try:
            return AutoConfig.from_pretrained(self.model_name_or_path, **self._hub_kwargs)
        except OSError as err:
            raise OSError(_load_error(self.model_name_or_path, "config.json", err)) from err

    def _build_model(self, hf_config, dtype: torch.dtype, load_weights: bool, attn_implementation: str | None):
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            return self._instantiate(hf_config, load_weights, kwargs)
        except ValueError as err:  # a model without SDPA support: use its default attention
            if "attn_implementation" not in kwargs or "sdpa" not in str(err).lower():
                raise
            logger.warning("%s does not support SDPA attention; using its default", self.model_name_or_path)
            kwargs.pop("attn_implementation")
            return self._instantiate(hf_config, load_weights, kwargs)

    def _instantiate(self, hf_config, load_weights: bool, kwargs: dict[str, Any]):
        auto_cls = self._auto_class()
        if not load_weights:
            if self._bnb_kwargs:
                raise ValueError("llm_kwargs.load_in_8bit/load_in_4bit quantise while loading the LLM's own weights: "
                                 "set load_llm_weights=True (not with a full BLIP-2 checkpoint's LLM)")
            from_config = getattr(auto_cls, "from_config", None) or auto_cls._from_config  # Auto* vs concrete
            return from_config(hf_config, **kwargs)
        hf_logger = logging.getLogger("transformers.modeling_utils")
        hf_logger.addFilter(_untied_checkpoint_notice)
        try:
            return auto_cls.from_pretrained(self.model_name_or_path, config=hf_config, **kwargs, **self._hub_kwargs,
                                            **self._bnb_kwargs)
        except OSError as err:
            raise OSError(_load_error(self.model_name_or_path, "weights", err)) from err
        finally:
            hf_logger.removeFilter(_untied_checkpoint_notice)

    def _after_build(self) -> None:
        """Hook for model-specific fix-ups after construction (e.g. untying T5's lm_head)."""

    # -- properties ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The LLM tokenizer, loaded on first use (meta instantiation needs no tokenizer files)."""
        if self._tokenizer is None:
            # transformers' model/config modules: seconds to import, loaded on first use
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **self._hub_kwargs)
            except (OSError, ValueError) as err:
                raise OSError(_load_error(self.tokenizer_name_or_path, "tokenizer", err)) from err
            if tok.pad_token is None:  # GPT-2 / Llama style: pad with eos (ignored by masks anyway)
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    @property
    def hidden_size(self) -> int:
        """Width of ``inputs_embeds`` (the Q-Former projection's output size)."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def newline_token_id(self) -> int:
        ids = self.tokenizer("\n", add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer of {self.tokenizer_name_or_path!r} encodes '\\n' as {ids}, not one token")
        return ids[0]

    @functools.cached_property
    def _other_newline_token_ids(self) -> list[int]:
        """Every token but "\\n" itself whose decoded text holds a newline (one pass over the vocabulary)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return [i for i, text in enumerate(texts) if "\n" in text and i != self.newline_token_id]

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end generation (and end a scored answer, with the first): "\\n" when asked (with
        ``stop_at_newline="any"`` every newline-holding token after it), then eos."""
        ids = [self.newline_token_id] if self.stop_at_newline else []
        if self.stop_at_newline == "any":
            ids += self._other_newline_token_ids
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    # -- frozen behaviour ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenLLM":
        """A frozen LLM stays in eval mode (no dropout) whatever the parent model does."""
        return super().train(False if self.frozen else mode)

    def _cpu_safe(self) -> None:
        """Never compute in fp16 on CPU: upcast once if fp16 weights ended up there."""
        if self.device.type == "cpu" and self.dtype == torch.float16:
            cpu_safe_(self.model, f"LLM {self.model_name_or_path}")

    def _cast(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.to(self.dtype) if embeds.is_floating_point() else embeds

    def _autocast(self):
        """Half-precision weights compute in their own dtype, whatever autocast the runner opened (a bf16 T5
        under an fp16 autocast would overflow); fp32 weights follow the ambient autocast (e.g. amp: bf16)."""
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    # -- the interface ------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, hidden_size] in the LLM dtype, as the LLM's input layer computes them."""
        self._cpu_safe()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model.get_input_embeddings()(ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> LLMOutput:
        """Decoder-only: ``labels`` [B,T] align with ``inputs_embeds`` [B,T,H] (-100 = not scored);
        the next-token shift happens here. The loss is computed in fp32.

        ``return_logits=False`` (with labels; ``logits`` is then None): the vocabulary projection, the largest
        matmul of a small LLM, runs only at the positions that predict a scored label (not over the soft prompt,
        the prompt or padding)."""
        self._cpu_safe()
        mask = labels[:, 1:].ne(-100) if labels is not None else None  # [B, T-1]: position t predicts label t+1
        select = mask is not None and not return_logits and self._selects_logit_rows
        # Boolean logits_to_keep: the model projects only these positions and returns them flattened [n, V].
        extra = {"logits_to_keep": F.pad(mask, (0, 1))} if select else {}
        with self._autocast():
            out = self.model(
                inputs_embeds=self._cast(inputs_embeds), attention_mask=attention_mask, use_cache=False, **extra
            )
        if labels is None:
            return LLMOutput(logits=out.logits)
        rows = out.logits if select else out.logits[:, :-1][mask]  # [n, V]
        nll = scored_rows_nll(rows, labels[:, 1:], mask)
        return output_with_loss(None if select else out.logits, nll, mask)

    @functools.cached_property
    def _selects_logit_rows(self) -> bool:
        """Whether the wrapped model takes a boolean ``logits_to_keep`` [B, T] mask: its forward has the argument and
        its module slices with transformers' ``slice_logits_to_keep`` (which accepts masks); a few models slice by
        hand and get every logit instead."""
        module = sys.modules.get(type(self.model).__module__)
        return ("logits_to_keep" in inspect.signature(self.model.forward).parameters
                and getattr(module, "slice_logits_to_keep", None) is not None)

    @functools.cached_property
    def _cache_name(self) -> str:
        """The wrapped model's name for the KV cache, as a forward argument and as an output attribute: ``cache``, or
        the older ``past_key_values``."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
    ) -> torch.Tensor:
        """New token ids [B * num_return_sequences, T] continuing ``inputs_embeds`` (prompt excluded)."""
        self._cpu_safe()
        kwargs: dict[str, Any] = dict(
            num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
            num_return_sequences=num_return_sequences, eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        if do_sample:
            kwargs.update(top_p=top_p, temperature=temperature)
        else:  # keep sampling-only defaults of some generation configs from warning
            kwargs.update(top_p=None, temperature=None, top_k=None)
        if num_beams == 1:  # only beam search reads it; greedy and sampling warn that it is ignored
            kwargs.pop("length_penalty")
        with self._autocast():
            embeds = self._cast(inputs_embeds)
            # generate repeats every input this many times (beams, or returned samples) before its first forward
            kwargs.update(self._shared_prefix_cache(embeds, attention_mask, max(num_beams, num_return_sequences)))
            return self.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def _shared_prefix_cache(self, embeds: torch.Tensor, attention_mask: torch.Tensor, copies: int) -> dict[str, Any]:
        """``generate`` kwargs with the KV cache of every input position but the last, computed once per input and
        repeated ``copies`` times (rows [B * copies], as generate repeats its inputs); ``{}`` when nothing is shared.

        Without it generate runs the whole soft prompt + prompt [B * copies, T] through the LLM, ``copies`` times the
        same work; with it, only the last position of each copy (generate feeds the positions the cache lacks).
        Encoder-decoder models already encode once."""
        if self.is_encoder_decoder or copies <= 1 or embeds.shape[1] < 2:
            return {}
        extra = {"logits_to_keep": 1} if self._selects_logit_rows else {}  # no logit is used: project one position
        out = self.model(inputs_embeds=embeds[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=True, **extra)
        cache = getattr(out, self._cache_name, None)
        if not hasattr(cache, "batch_repeat_interleave"):
            return {}
        cache.batch_repeat_interleave(copies)
        return {self._cache_name: cache}

    @torch.no_grad()
    def prefix_state(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Decoder-only: (log p(next token | prefix) [B, V] in fp32, the prefix's KV cache) for ``embeds`` [B, L, H]."""
        self._cpu_safe()
        extra = {"logits_to_keep": 1} if self._selects_logit_rows else {}
        with self._autocast():
            out = self.model(inputs_embeds=self._cast(embeds), attention_mask=attention_mask, use_cache=True, **extra)
        return out.logits[:, -1].float().log_softmax(-1), getattr(out, self._cache_name)

    @torch.no_grad()
    def continuation_nll(self, first_log_probs: torch.Tensor, cache: Any, prefix_mask: torch.Tensor,
                         targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL [k], token count [k]) of each token row of ``targets`` after one unpadded prefix, from
        ``prefix_state`` of that prefix ([1, V] log-probs, its cache, ``prefix_mask`` [1, L]). Each row runs only
        through its own tokens against the shared cache (consumed: repeated to k rows and extended), the same
        numbers as running [prefix; row] in full. Rows are right-padded; padding is neither attended nor scored."""
        k, width = len(targets), max(len(t) for t in targets)
        ids = torch.full((k, width), self.pad_token_id, dtype=torch.long, device=first_log_probs.device)
        mask = torch.zeros((k, width), dtype=torch.bool, device=first_log_probs.device)
        for row, t in enumerate(targets):
            ids[row, : len(t)] = torch.tensor(t, device=ids.device)
            mask[row, : len(t)] = True
        nll = -first_log_probs[0, ids[:, 0]]  # [k]: the prefix's last position predicts each row's first token
        if width > 1:
            length = prefix_mask.shape[1]
            cache.batch_repeat_interleave(k)
            attention = torch.cat([prefix_mask.expand(k, -1), mask[:, :-1].to(prefix_mask.dtype)], dim=1)
            positions = torch.arange(length, length + width - 1, device=ids.device).expand(k, -1)
            with self._autocast():
                out = self.model(inputs_embeds=self._cast(self.embed_tokens(ids[:, :-1])), attention_mask=attention,
                                 position_ids=positions, use_cache=True, **{self._cache_name: cache})
            picked = out.logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [k, width - 1]
            nll = nll - (picked * mask[:, 1:]).sum(1)
        return nll, mask.sum(1)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> stripped strings (special tokens removed); with ``stop_at_newline="any"`` a text ends at
        its first newline (a stop token holding text before its newline, e.g. ".\\n", keeps that text)."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if self.stop_at_newline == "any":
            texts = [t.split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]

    def materialize_computed_buffers(self, device: torch.device | str = "cpu") -> list[str]:
        """After a meta-device build took its weights from a checkpoint: buffers no checkpoint holds (non-persistent,
        e.g. Llama's rotary ``inv_freq``) are computed on ``device`` by the model's own initialisation of the module
        that owns them. Returns their names."""
        done = []
        for prefix, module in self.model.named_modules():
            names = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
            if not names:
                continue
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # a module whose weights are missing too: reported by the caller
            for name in names:
                module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
            self.model._init_weights(module)
            done += [f"{prefix}.{n}" if prefix else n for n in names]
        return done

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a Hugging Face state dict of the wrapped model (keys as in ``self.model.state_dict()``)."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=self.device.type == "meta")

    def extra_repr(self) -> str:
        source = f"gguf_file={self.gguf_file!r}" if self.gguf_file else repr(self.model_name_or_path)
        return f"{source}, dtype={self.dtype}, frozen={self.frozen}"


class FrozenSeq2SeqLM(FrozenLLM):
    """Encoder-decoder adapter: ``inputs_embeds`` feed the encoder, ``labels`` are decoder targets."""

    auto_model_name: ClassVar[str] = "AutoModelForSeq2SeqLM"
    is_encoder_decoder: ClassVar[bool] = True

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> LLMOutput:
        """``labels`` [B,T_out] are the decoder targets (-100 = padding); the decoder input is them
        shifted right (decoder start token first). Logits [B,T_out,V] (None when ``return_logits=False``);
        loss in fp32."""
        if labels is None:
            raise ValueError(f"{type(self).__name__}.forward needs decoder target labels")
        self._cpu_safe()
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        with self._autocast():
            out = self.model(
                inputs_embeds=self._cast(inputs_embeds), attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask, use_cache=False,
            )
        nll, mask = token_nll(out.logits, labels)
        return output_with_loss(out.logits if return_logits else None, nll, mask)


def _untied_checkpoint_notice(record: logging.LogRecord) -> bool:
    """Drop transformers' notice that an untied checkpoint (Flan-T5) is loaded untied: that is what we want."""
    return "so we will NOT tie them" not in record.getMessage()


def _load_error(name: str, what: str, err: Exception) -> str:
    hint = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if hub_offline() else ""
    return (
        f"could not load the LLM {what} from {name!r}{hint}: {err}. Expected a Hugging Face hub id, or a local "
        f"directory with config.json (+ weights, tokenizer files)."
    )
