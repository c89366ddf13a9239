"""``Blip2LLMBase``: what the stage-2 models (``blip2_opt``, ``blip2_t5``) share.

image -> frozen encoder -> ln_vision -> Q-Former queries (optionally conditioned on the question text, paper
section 4.3) -> ``<llm>_proj`` -> soft prompt of a frozen LLM adapter (``models/llms.py``).

Subclasses say how a batch of (prompt, target) texts becomes LLM inputs (decoder-only: one sequence; encoder-
decoder: encoder prefix + decoder target); captioning, answer generation and answer ranking are shared here.
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

import registry
from models.base_model import config_kwargs, parameter_names
from models.blip2_base import Blip2Base, to_plain
from models.checkpoints import load_state_dict_any, resolve_source
from models.checkpoints.blip2_keys import QFORMER_TEXT_PARTS, STAGE1_ONLY_PARTS
from models.llm_adapter import FrozenLLM
from models.lora import LoraSettings, apply_lora

logger = logging.getLogger(__name__)



class Blip2LLMBase(Blip2Base):
    """Stage-2 BLIP-2: Q-Former queries as a soft prompt for a frozen LLM."""

    LLM_ATTR: ClassVar[str] = "llm_model"  # LAVIS attribute name of the LLM (opt_model / t5_model)
    PROJ_ATTR: ClassVar[str] = "llm_proj"  # LAVIS name of the projection (opt_proj / t5_proj)
    LLM_NAME_KEY: ClassVar[str] = "llm_model"  # config key naming the LLM checkpoint
    DEFAULT_LLM_TYPE: ClassVar[str] = "hf_causal_lm"
    EXPECT_ENCODER_DECODER: ClassVar[bool] = False
    DEFAULT_QFORMER: ClassVar[str] = "bert_qformer"  # registry.qformers name used when model.qformer is unset
    #: ``predict_answers``' length penalty when the caller gives none: LAVIS's default per family (OPT 0, Flan-T5 -1)
    ANSWER_LENGTH_PENALTY: ClassVar[float] = 0.0
    #: LAVIS key names of constructor parameters (the LLM's key is ``LLM_NAME_KEY``, added by ``config_aliases``)
    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"bert": "qformer_bert", "tokenizer": "qformer_tokenizer"}
    #: read by ``weight_plan`` and by ``from_config`` (the Q-Former text weights of a stage-1 checkpoint, LoRA)
    EXTRA_CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("weights", "hf_hub_id", "qformer_text_checkpoint", "lora")
    #: computed by ``build_kwargs``: the vision keys are flat in a config, the rest follow from the weight plan
    CONSTRUCTOR_ONLY: ClassVar[tuple[str, ...]] = ("vision", "llm_from_checkpoint", "qformer_bert_weights")

    def __init__(
        self,
        llm_model: str,
        llm_type: str | None = None,
        llm_precision: str = "auto",
        load_llm_weights: bool = True,
        llm_from_checkpoint: bool = False,
        llm_kwargs: Mapping[str, Any] | None = None,
        vision: Mapping[str, Any] | None = None,
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        qformer_bert: str | None = None,
        qformer_config: Mapping[str, Any] | None = None,
        qformer_text_input: bool = False,
        qformer_tokenizer: str | None = None,
        qformer_bert_weights: bool = True,
        prompt: str = "",
        max_txt_len: int = 32,
        qformer: str | None = None,
    ) -> None:
        super().__init__()
        vision = dict(vision or {})
        self.init_vision_encoder(**vision)
        self.init_qformer(
            num_query_token, self.visual_encoder.num_features, cross_attention_freq, bert=qformer_bert,
            qformer_config=qformer_config, use_grad_checkpoint=bool(vision.get("use_grad_checkpoint", False)),
            bert_weights=qformer_bert_weights,
            qformer=qformer or self.DEFAULT_QFORMER,
        )
        # Stage 2 needs only the query path, unless the question (or, for an instruction-aware Q-Former, the
        # instruction) also enters the Q-Former.
        self.qformer_text_input = bool(qformer_text_input) or bool(getattr(self.Qformer, "instruction_aware", False))
        self.Qformer.remove_text_modules(keep_text_input=self.qformer_text_input)
        self.tokenizer = self.init_tokenizer(qformer_tokenizer, bert=qformer_bert) if self.qformer_text_input else None
        self._qformer_text_loaded = bool(qformer_bert) and qformer_bert_weights  # text parts from BERT, or later from a stage-1 checkpoint
        self._checkpoint_has_proj = True  # set per checkpoint read (see _state_dict_pieces)

        llm_cls = registry.llms.get(llm_type or self.DEFAULT_LLM_TYPE)
        # llm_from_checkpoint: a full BLIP-2 checkpoint (Hugging Face) brings the LLM's weights, so the LLM is built
        # on the meta device and takes them as they are read: no random initialisation, no second copy in memory.
        with torch.device("meta") if llm_from_checkpoint else contextlib.nullcontext():
            llm = llm_cls(llm_model, precision=llm_precision, freeze=True,
                          load_weights=load_llm_weights and not llm_from_checkpoint, **dict(llm_kwargs or {}))
        if not isinstance(llm, FrozenLLM) or llm.is_encoder_decoder != self.EXPECT_ENCODER_DECODER:
            kind = "an encoder-decoder" if self.EXPECT_ENCODER_DECODER else "a decoder-only"
            raise ValueError(f"{type(self).__name__} needs {kind} LLM adapter; llm_type={llm_type!r} is not")
        setattr(self, self.LLM_ATTR, llm)
        self._llm_weights_loaded = bool(load_llm_weights) and llm.device.type != "meta"
        setattr(self, self.PROJ_ATTR, nn.Linear(self.Qformer.config.hidden_size, llm.hidden_size))
        self.prompt = prompt or ""
        self.max_txt_len = int(max_txt_len)

    # -- parts ---------------------------------------------------------------------------------------------------
    @property
    def llm(self) -> FrozenLLM:
        return self._modules[self.LLM_ATTR]

    @property
    def llm_proj(self) -> nn.Linear:
        return self._modules[self.PROJ_ATTR]  # (the LAVIS name may be this property's own: llm_proj)

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + [self.llm]

    def _missing_key_is_expected(self, key: str) -> bool:
        """LLM weights may be absent from a checkpoint only if the LLM was loaded from its own source
        (LAVIS checkpoints); a Hugging Face BLIP-2 checkpoint must bring them (tied aliases excepted)."""
        if key.startswith(self.LLM_ATTR + "."):
            return self._llm_weights_loaded or key in self._llm_alias_keys()
        if QFORMER_TEXT_PARTS.match(key):
            return self._qformer_text_loaded
        if key.startswith(self.PROJ_ATTR + ".") and not self._checkpoint_has_proj:
            return True  # a stage-1 checkpoint: the projection starts from its initialisation
        if key.startswith("Qformer.") and "lora_" not in key and getattr(self, "qformer_adapted", False):
            return True  # LoRA on the Q-Former: its own weights are frozen (from the starting checkpoint), not saved
        return super()._missing_key_is_expected(key)

    def _unexpected_key_is_expected(self, key: str) -> bool:
        """Stage-1 heads (ITC/ITM/ITG), without question conditioning the Q-Former text path, and an LLM's computed
        constants that an older checkpoint saved (LAVIS's vendored Llama kept its rotary ``inv_freq`` persistent)."""
        if STAGE1_ONLY_PARTS.match(key):
            return True
        if key.startswith(self.LLM_ATTR + ".") and key.endswith("rotary_emb.inv_freq"):
            return True
        if QFORMER_TEXT_PARTS.match(key):
            return not self.qformer_text_input
        return super()._unexpected_key_is_expected(key)

    def load_qformer_text(self, source: str) -> None:
        """Q-Former text parts (word/position embeddings, text FFNs) from a stage-1 checkpoint (any format), for
        ``qformer_text_input`` on top of a stage-2 checkpoint, which never holds them."""
        state = {k: v for k, v in load_state_dict_any(source).items() if QFORMER_TEXT_PARTS.match(k)}
        wanted = {k for k in self.state_dict() if QFORMER_TEXT_PARTS.match(k)}
        if wanted - set(state):
            raise KeyError(f"model.qformer_text_checkpoint {source}: no Q-Former text weights "
                           f"{sorted(wanted - set(state))[:4]}...; expected a stage-1 (blip2) checkpoint")
        nn.Module.load_state_dict(self, state, strict=False)
        self._qformer_text_loaded = True

    def _llm_tied_groups(self, prefix: str = "") -> list[list[str]]:
        """Names (under ``prefix``) of LLM parameters that share one tensor (tied embeddings), a list per tensor."""
        by_tensor: dict[int, list[str]] = {}
        for name, param in self.llm.named_parameters(prefix=prefix, remove_duplicate=False):
            by_tensor.setdefault(id(param), []).append(name)
        return [names for names in by_tensor.values() if len(names) > 1]

    def _llm_alias_keys(self) -> set[str]:
        """Names of LLM parameters that are a second name of another parameter (tied embeddings)."""
        return {name for names in self._llm_tied_groups(self.LLM_ATTR) for name in names[1:]}

    def _state_dict_pieces(self, path_or_url: str) -> Iterator[dict[str, Tensor]]:
        """Any checkpoint format, with Hugging Face LLM keys placed where this model keeps its LLM; notes whether
        the checkpoint brings the LLM projection (a stage-1 checkpoint does not)."""
        has_proj = False
        for piece in super()._state_dict_pieces(path_or_url):
            has_proj = has_proj or any(k.startswith(self.PROJ_ATTR + ".") for k in piece)
            yield piece
        self._checkpoint_has_proj = has_proj
        if not has_proj:
            logger.info("%s holds no %s (a stage-1 checkpoint): the projection keeps its initialisation",
                        path_or_url, self.PROJ_ATTR)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a checkpoint that brings LLM weights marks them as loaded, and a tied
        seq2seq checkpoint without ``lm_head`` gets it from the shared embedding."""
        prefix = f"{self.LLM_ATTR}.model."
        if any(k.startswith(prefix) for k in state_dict):
            shared, head = prefix + "shared.weight", prefix + "lm_head.weight"
            if self.EXPECT_ENCODER_DECODER and shared in state_dict and head not in state_dict:
                state_dict = {**state_dict, head: state_dict[shared]}
            if any(p.is_meta for p in self.llm.parameters()):
                # An LLM built on the meta device takes the checkpoint's tensors (assign), cast to the dtype each
                # tensor of this model has (its precision), as copying into existing tensors would.
                own = self.state_dict(keep_vars=True)
                state_dict = {k: v.to(own[k].dtype) if k in own else v for k, v in state_dict.items()}
                assign = True
            self._llm_weights_loaded = True
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_checkpoint(self, path_or_url: str, strict: bool = True) -> dict[str, list[str]]:
        """``BaseModel.load_checkpoint``; an LLM built on the meta device must get every tensor from it."""
        on_meta = any(p.is_meta for p in self.llm.parameters())
        # tied names share one parameter; a checkpoint holds one of them, and assigning it replaces only that name,
        # so the sharing is restored afterwards
        tied = self._llm_tied_groups()
        result = super().load_checkpoint(path_or_url, strict=strict)
        if on_meta:
            for names in tied:
                loaded = [self.llm.get_parameter(n) for n in names if not self.llm.get_parameter(n).is_meta]
                if not loaded:
                    continue  # reported below as left on meta
                for name in names:
                    owner, _, leaf = name.rpartition(".")
                    setattr(self.llm.get_submodule(owner), leaf, loaded[0])
            self.llm.materialize_computed_buffers(self.query_tokens.device)
            left = [name for name, t in [*self.llm.named_parameters(), *self.llm.named_buffers()] if t.is_meta]
            if left:
                raise ValueError(f"checkpoint {path_or_url} holds no weights for {len(left)} LLM tensors "
                                 f"(e.g. {left[:3]}); pass load_llm_weights=True to load the LLM from its own source")
        self.llm.apply_quantization()  # a quantised LLM built on the meta device: now that its weights are here
        return result

    # -- queries -> soft prompt --------------------------------------------------------------------------------------
    def _qformer_text(self, texts: Sequence[str], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        if not self.qformer_text_input:
            return None, None
        tokens = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_txt_len,
                                return_tensors="pt").to(device)
        return tokens.input_ids, tokens.attention_mask

    def soft_prompt(self, samples: Mapping[str, Any], qformer_texts: Sequence[str] | None = None) -> Tensor:
        """Projected query outputs [B, Q, H_llm] (fp32). With ``qformer_text_input`` the Q-Former also reads
        ``qformer_texts`` (the questions) in the same bidirectional pass; only the query outputs are used.

        A video ``samples["image"]`` [B, 3, T, H, W] goes frame by frame through the encoder and the Q-Former (the
        text repeated per frame), and the frames' projected queries are concatenated in frame order: [B, T*Q, H_llm]
        (LAVIS InstructBLIP on video, ``InstructBlipVideoForConditionalGeneration``)."""
        image = samples.get("image") if hasattr(samples, "get") else None
        if image is not None and image.ndim == 5:
            batch, frames = image.shape[0], image.shape[2]
            flat = image.transpose(1, 2).flatten(0, 1)  # [B*T, 3, H, W], a clip's frames adjacent
            texts = None if qformer_texts is None else [t for t in qformer_texts for _ in range(frames)]
            soft = self.soft_prompt({"image": flat}, texts)  # [B*T, Q, H_llm]
            return soft.reshape(batch, frames * soft.shape[1], soft.shape[2])
        image_embeds = self.image_embeds_from_samples(samples)  # [B, N, W]
        text_ids, text_atts = (None, None)
        if self.qformer_text_input:
            if qformer_texts is None:
                raise ValueError("qformer_text_input=True needs the question text (samples['text_input'])")
            text_ids, text_atts = self._qformer_text(qformer_texts, image_embeds.device)
        out = self.query_features(image_embeds, text_ids, text_atts)
        num_query = self.query_tokens.shape[1]
        return self.llm_proj(out.last_hidden_state[:, :num_query])  # [B, Q, H_llm]

    # -- subclass hooks ----------------------------------------------------------------------------------------------
    def lm_inputs(self, soft: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        """Adapter ``forward`` kwargs scoring ``targets`` after ``[soft prompt; prompt]`` (one pair per row)."""
        raise NotImplementedError

    def generation_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(inputs_embeds, attention_mask) to continue after ``[soft prompt; prompt]``."""
        raise NotImplementedError

    def first_token_log_probs(self, soft: Tensor, prompts: Sequence[str]) -> Tensor:
        """log p(first answer token | image, prompt) [B, V]."""
        raise NotImplementedError

    def target_ids(self, prompt: str, answers: Sequence[str]) -> list[list[int]]:
        """Token ids the LLM must produce for each answer after ``prompt`` (end token included); one batched
        tokenizer call, since ranking tokenizes the whole answer list for every question."""
        raise NotImplementedError

    # -- shared helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def _texts(value: Any, batch: int, what: str) -> list[str]:
        """A string (repeated) or one string per image."""
        if isinstance(value, str):
            return [value] * batch
        value = list(value)
        if len(value) != batch or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{what} must be a string or a list of {batch} strings (one per image), got {value!r}")
        return value

    @staticmethod
    def format_prompts(prompt: str, questions: Sequence[str]) -> list[str]:
        """``prompt.format(question)`` per question (e.g. "Question: {} Short answer:"); no prompt = the question."""
        if not prompt:
            return list(questions)
        if "{}" not in prompt:
            raise ValueError(f"a question prompt needs a '{{}}' placeholder for the question, got {prompt!r}")
        return [prompt.format(q) for q in questions]

    def weighted_answer_loss(self, samples: Mapping[str, Any], prompts: list[str], soft: Tensor) -> Tensor:
        """VQA training with several weighted answers per question (``answers``, ``weights``): the question
        is repeated per answer; loss = sum_i sum_j w_ij * NLL(answer_ij) / B (as BLIP's VQA fine-tuning)."""
        answers, weights = samples["answers"], samples.get("weights")
        rows, flat_prompts, flat_answers, flat_weights = [], [], [], []
        for i, answer_list in enumerate(answers):
            answer_list = [answer_list] if isinstance(answer_list, str) else list(answer_list)
            w = list(weights[i]) if weights is not None else [1.0 / len(answer_list)] * len(answer_list)
            if len(w) != len(answer_list):
                raise ValueError(f"samples['weights'][{i}] has {len(w)} entries for {len(answer_list)} answers")
            for answer, weight in zip(answer_list, w):
                rows.append(i)
                flat_prompts.append(prompts[i])
                flat_answers.append(answer)
                flat_weights.append(float(weight))
        index = torch.tensor(rows, device=soft.device)
        out = self.llm(**self.lm_inputs(soft[index], flat_prompts, flat_answers), return_logits=False)
        w = torch.tensor(flat_weights, device=out.nll.device)
        return (w * out.nll).sum() / len(answers)

    # -- inference -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        samples: Mapping[str, Any],
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> list[str]:
        """Captions (or continuations of ``samples["prompt"]``: one string, or one per image).

        ``max_length``/``min_length`` count new tokens. Returns B * ``num_captions`` strings, image by image.
        """
        batch = self._batch_size(samples)
        prompts = self._texts(samples.get("prompt") or self.prompt, batch, "samples['prompt']")
        soft = self.soft_prompt(samples, self.generation_qformer_texts(samples, prompts))
        embeds, atts = self.generation_inputs(soft, prompts)
        ids = self.llm.generate(
            embeds, atts, num_beams=num_beams, max_new_tokens=max_length, min_new_tokens=min_length,
            do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, num_return_sequences=num_captions,
        )
        return self.llm.decode(ids)

    def generation_qformer_texts(self, samples: Mapping[str, Any], prompts: list[str]) -> list[str] | None:
        """What the Q-Former reads when captioning: the questions (``text_input``) if it reads text, else None."""
        if not self.qformer_text_input:
            return None
        texts = samples.get("text_input", prompts)
        return [texts] * len(prompts) if isinstance(texts, str) else texts

    @torch.no_grad()
    def predict_answers(
        self,
        samples: Mapping[str, Any],
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list: Sequence[str] | None = None,
        prompt: str = "",
        length_penalty: float | None = None,
    ) -> list[str]:
        """Answer ``samples["text_input"]`` (questions) about ``samples["image"]``.

        ``generate``: beam search (``num_beams``, ``max_len``/``min_len`` new tokens, ``length_penalty``).
        ``rank``: the ``num_ans_candidates`` candidates of ``answer_list`` with the most likely first token are
        re-scored by their full LM log-likelihood (end token included), normalised as beam search does
        (``sum_logprob / num_tokens ** length_penalty``); the best one is returned. ``length_penalty`` None: the
        family's ``ANSWER_LENGTH_PENALTY`` (LAVIS: 0 for OPT, -1 for Flan-T5).
        """
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        prompts = self.format_prompts(prompt or self._question_prompt(), questions)
        soft = self.soft_prompt(samples, questions)
        length_penalty = self.ANSWER_LENGTH_PENALTY if length_penalty is None else length_penalty
        if inference_method == "generate":
            embeds, atts = self.generation_inputs(soft, prompts)
            ids = self.llm.generate(embeds, atts, num_beams=num_beams, max_new_tokens=max_len,
                                    min_new_tokens=min_len, length_penalty=length_penalty)
            return self.llm.decode(ids)
        if inference_method == "rank":
            if not answer_list:
                raise ValueError("predict_answers(inference_method='rank') needs a non-empty answer_list")
            return self.rank_answers(soft, prompts, list(answer_list), num_ans_candidates, length_penalty)
        raise ValueError(f"inference_method must be 'generate' or 'rank', got {inference_method!r}")

    def _question_prompt(self) -> str:
        return self.prompt if "{}" in self.prompt else ""

    @torch.no_grad()
    def rank_answers(
        self, soft: Tensor, prompts: list[str], answer_list: list[str], num_ans_candidates: int,
        length_penalty: float = 0.0,
    ) -> list[str]:
        """Best answer of ``answer_list`` per image (see ``predict_answers``).

        Decoder-only LLMs: each question's [soft prompt; prompt] runs once, unpadded; its last position ranks the first
        tokens and its KV cache serves the k candidates, which then run only through their own tokens (a few) instead
        of the whole prefix again (about 25 positions for short questions), k times. Encoder-decoder LLMs: one batched
        first-token pass, then each question's candidates in full."""
        k = max(1, min(int(num_ans_candidates), len(answer_list)))
        shared_prefix = not self.llm.is_encoder_decoder
        first = None if shared_prefix else self.first_token_log_probs(soft, prompts)  # [B, V]
        best = []
        for i, prompt in enumerate(prompts):
            if shared_prefix:
                embeds, atts = self.generation_inputs(soft[i : i + 1], [prompt])  # [1, L, H]: one row, no padding
                row, cache = self.llm.prefix_state(embeds, atts)  # [1, V]
            else:
                row = first[i : i + 1]
            targets = self.target_ids(prompt, answer_list)
            first_ids = torch.tensor([t[0] for t in targets], device=row.device)
            top = row[0, first_ids].float().topk(k).indices.tolist()  # candidates by first-token probability
            if k == 1:
                best.append(answer_list[top[0]])
                continue
            if shared_prefix:
                nll, num_tokens = self.llm.continuation_nll(row, cache, atts, [targets[j] for j in top])
            else:
                out = self.llm(**self.lm_inputs(soft[i : i + 1].expand(k, -1, -1), [prompt] * k,
                                                [answer_list[j] for j in top]), return_logits=False)
                nll, num_tokens = out.nll, out.num_tokens
            scores = -nll / num_tokens.float().clamp(min=1) ** length_penalty
            best.append(answer_list[top[int(scores.argmax())]])
        return best

    @staticmethod
    def _batch_size(samples: Mapping[str, Any]) -> int:
        for key in ("image", "image_embeds"):
            if samples.get(key) is not None:
                return samples[key].shape[0]
        raise KeyError("samples need 'image' [B,3,S,S] (or precomputed 'image_embeds' [B,N,W])")

    # -- building ----------------------------------------------------------------------------------------------------
    @classmethod
    def config_aliases(cls) -> dict[str, str]:
        return {**cls.CONFIG_ALIASES, cls.LLM_NAME_KEY: "llm_model"}

    @classmethod
    def config_parameters(cls) -> list[str]:
        """The constructor's parameters and, flat in a config, ``init_vision_encoder``'s."""
        return super().config_parameters() + parameter_names(Blip2Base.init_vision_encoder)

    @classmethod
    def build_kwargs(cls, cfg: DictConfig | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(constructor arguments, weight plan) from a model config (LAVIS key names plus ours). Only the keys the
        config sets are passed: every other argument keeps the constructor's default."""
        cfg = to_plain(cfg)
        plan = cls.weight_plan(cfg)
        vision = cls.vision_config(cfg)
        vision["vit_pretrained"] = plan["vit_pretrained"]
        if not cfg.get(cls.LLM_NAME_KEY):
            raise KeyError(f"model.{cls.LLM_NAME_KEY} must name the LLM (hub id, local dir or tiny:...)")
        names = [name for name in cls.config_parameters() if name not in vision]
        kwargs = config_kwargs(cfg, names, cls.config_aliases())
        llm_kwargs = dict(kwargs.get("llm_kwargs") or {})
        llm_in_checkpoint = bool(plan["source"] == "hf" and plan["checkpoints"])  # a full HF BLIP-2 checkpoint
        if llm_in_checkpoint and not cfg.get("load_llm_weights", False):
            llm_kwargs = {**hf_llm_sources(plan["checkpoints"][0]), **llm_kwargs}
            # The checkpoint holds the LLM: build it on the meta device from its config, and the checkpoint's
            # tensors become its weights (no random initialisation, one copy in memory).
            kwargs.update(load_llm_weights=False, llm_from_checkpoint=True)
        kwargs.update(llm_kwargs=llm_kwargs, vision=vision, qformer_bert=plan["bert"] or plan["bert_shape"],
                      qformer_bert_weights=bool(plan["bert"]))
        if kwargs.get("qformer_tokenizer") is None:  # null: the BERT checkpoint's own tokenizer
            kwargs["qformer_tokenizer"] = cfg.get("bert") or "bert-base-uncased"
        return kwargs, plan

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> "Blip2LLMBase":
        kwargs, plan = cls.build_kwargs(cfg)
        model = cls(**kwargs)
        if torch.get_default_device().type == "meta":
            return model  # shapes only: nothing to load
        text_checkpoint = to_plain(cfg).get("qformer_text_checkpoint")
        if model.qformer_text_input and text_checkpoint and not model._qformer_text_loaded:
            model.load_qformer_text(text_checkpoint)
        for checkpoint in plan["checkpoints"]:
            model.load_checkpoint(checkpoint)
        lora = LoraSettings.from_config(to_plain(cfg).get("lora"))
        if lora is not None:  # after the checkpoints: they hold the weights the adapters start from
            apply_lora(model, lora)
        return model


def hf_llm_sources(hf_checkpoint: str) -> dict[str, Any]:
    """LLM ``config`` (the checkpoint's ``text_config``) and tokenizer directory of a Hugging Face BLIP-2 checkpoint,
    so that only that one checkpoint is downloaded. ``{}`` when it cannot be resolved now (e.g. offline on the meta
    device): the LLM then comes from its own name, and loading the checkpoint reports the real problem."""
    try:
        path = resolve_source(hf_checkpoint)
    except FileNotFoundError as err:
        logger.info("LLM config from %s unavailable (%s); using the LLM's own config", hf_checkpoint, err)
        return {}
    folder = path if path.is_dir() else path.parent
    sources: dict[str, Any] = {}
    config_file = folder / "config.json"
    if config_file.exists():
        text_config = json.loads(config_file.read_text()).get("text_config") or {}
        if "model_type" in text_config and ({"hidden_size", "d_model"} & set(text_config)):
            sources["config"] = text_config
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        sources["tokenizer_name_or_path"] = str(folder)
    return sources
