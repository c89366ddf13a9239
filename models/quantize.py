"""Quantised frozen parts: fewer bytes per weight for the parts that dominate memory and inference time.

``llm_kwargs`` of a stage-2 model select it for the LLM (the adapters in ``models/llms.py`` call in here):

- ``quantization: int8`` - weight-only int8 on any device, PyTorch's own kernel (``aten._weight_int8pack_mm``):
  every ``nn.Linear`` of the LLM keeps its weight as int8 with one fp scale per output channel (symmetric, absmax),
  activations stay in the LLM's dtype. A quarter of the fp32 bytes are read per decoding step.
- ``quantization: int8_dynamic`` - PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``, CPU):
  int8 weights and per-batch int8 activations through fbgemm.
- ``load_in_8bit`` / ``load_in_4bit`` - bitsandbytes on CUDA (``transformers``' ``BitsAndBytesConfig``), when both
  are present; elsewhere a clear error naming the CPU options above.

Embeddings stay in their dtype: the soft prompt enters through ``inputs_embeds``. With ``int8`` an output projection
tied to them stays too (tied weights must stay one tensor, and a frozen int8 LLM still passes gradients);
``int8_dynamic`` is inference only, so there a tied output projection gets its own quantised copy.

``model.vit_precision: int8_dynamic`` gives a frozen image encoder's linear layers the same fbgemm dynamic int8 on CPU
(``models/blip2_base.py``). Its layers (``FrozenDynamicInt8Linear``) load like frozen parts: a checkpoint without
their keys leaves them as they are, fp32 ``weight``/``bias`` (a checkpoint that holds the encoder) are quantised.
``quantize_for_inference(model)`` does it for the trainable Q-Former of a model built for inference.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.nn.quantized.modules.linear import LinearPackedParams
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from models.lm_weights import untie_lm_head

METHODS = ("int8", "int8_dynamic")


class _Int8MatMul(torch.autograd.Function):
    """x [n, in] @ (q * s).T with PyTorch's CPU kernel; the backward gives x its gradient (the weights are frozen), so
    a trainable part before the LLM (the Q-Former, through the soft prompt) still learns."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        return grad @ (q.to(grad.dtype) * scale.to(grad.dtype)[:, None]), None, None


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with an int8 weight [out, in] and per-output-channel scales [out]: y = x @ (q * s).T + b."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16) and flat.shape[0] > 0:
            out = _Int8MatMul.apply(flat.contiguous(), self.weight, self.scale.to(flat.dtype))
        else:  # other devices/dtypes: dequantise on the fly (same numbers, no int8 kernel)
            out = F.linear(flat, self.weight.to(flat.dtype) * self.scale.to(flat.dtype)[:, None])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8 per-channel"


class _FrozenPackedParams(LinearPackedParams):
    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        if any(key.startswith(prefix) for key in state_dict):  # absent: the frozen layer keeps its weights
            super()._load_from_state_dict(state_dict, prefix, *args)


class FrozenDynamicInt8Linear(DynamicQuantizedLinear):
    """torch's dynamic int8 ``Linear`` (fbgemm: int8 weight, per-tensor scale; activations quantised per call) for
    a frozen layer. ``load_state_dict`` reads its own saved format, quantises an fp32 ``weight``/``bias`` and leaves
    the layer as it is when the state dict has neither (torch's own class fails on a state dict without its keys)."""

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype=torch.qint8) -> None:
        super().__init__(in_features, out_features, bias_, dtype=dtype)
        packed = _FrozenPackedParams(dtype)
        packed.set_weight_bias(*self._packed_params._weight_bias())
        self._packed_params = packed

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "scale" in state_dict:  # the format state_dict() writes
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        weight, bias = state_dict.pop(prefix + "weight", None), state_dict.pop(prefix + "bias", None)
        if weight is None and bias is None:
            return
        qweight = self.weight()
        if weight is not None:
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} in the checkpoint, "
                                  f"{(self.out_features, self.in_features)} in the model")
                return
            linear = nn.Linear(self.in_features, self.out_features, bias=False)
            linear.weight.data = weight.detach().float()
            linear.qconfig = _QCONFIGS[qweight.qscheme() == torch.per_channel_affine]  # the scheme it was built with
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's deprecation notice, as below
                qweight = DynamicQuantizedLinear.from_float(linear).weight()
        self.set_weight_bias(qweight, self.bias() if bias is None else bias.detach().float())


_QCONFIGS = {False: default_dynamic_qconfig, True: per_channel_dynamic_qconfig}  # per output channel?


def _tied_to_embeddings(model: nn.Module) -> set[int]:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {id(embed.weight)} if embed is not None else set()


def quantize_linear_layers(model: nn.Module, method: str, key: str = "llm_kwargs.quantization",
                           per_channel: bool = False) -> int:
    """Replace the ``nn.Linear`` layers of ``model`` in place (``method`` in ``METHODS``); returns how many. ``key``:
    the config key that asked for it, for the error messages; ``per_channel``: ``int8_dynamic`` weights with one scale
    per output channel instead of one per tensor (``int8`` always has them)."""
    if method not in METHODS:
        raise ValueError(f"{key} must be one of {', '.join(METHODS)} (or null); got {method!r}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{key}: cannot quantise a model whose weights are not loaded yet (meta device)")
    tied = _tied_to_embeddings(model)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and id(module.weight) not in tied]
    if method == "int8_dynamic":
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise ValueError(f"{key}=int8_dynamic runs on CPU only (fbgemm); the model is on another device")

        names = {name for name, _ in targets}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is nn.Linear and id(head.weight) in tied:
            # inference only (no backward through these layers), so the tie can go: the output projection gets its
            # own copy, quantised like every other linear layer (in OPT-125m a third of the weights each decoding
            # step reads), and the input embeddings stay as they are for the soft prompt
            untie_lm_head(model)
            names.add(next(name for name, module in model.named_modules() if module is head))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice; the API is what this method names
            quantize_dynamic(model, qconfig_spec=dict.fromkeys(names, _QCONFIGS[per_channel]), dtype=torch.qint8,
                             inplace=True, mapping={nn.Linear: FrozenDynamicInt8Linear})
        return len(names)
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, Int8WeightOnlyLinear(module))
    return len(targets)


def quantize_image_encoder(encoder: nn.Module, method: str) -> int:
    """``model.vit_precision: int8_dynamic``: the frozen encoder's ``nn.Linear`` layers quantised in place, weights
    per output channel (as fast as per tensor at the encoder's row counts, smaller error); returns how many. timm's EVA attention with separate q/v biases reads its qkv weight directly (``F.linear``); it is
    switched to calling the layer and adding those biases (its ``qkv_bias_separate``, the same sum)."""
    for module in encoder.modules():
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return quantize_linear_layers(encoder, method, key="model.vit_precision", per_channel=True)


def quantize_for_inference(model: nn.Module, method: str = "int8_dynamic") -> int:
    """A BLIP-2 model's Q-Former with ``int8_dynamic`` linear layers (CPU), for inference only; returns how many.

    The Q-Former is the part training trains, so no config key does this: it is called on a model built for
    inference (the frozen ViT and LLM have their own keys). The model is put in eval mode, its Q-Former frozen, and
    ``model.train()`` refuses afterwards (``Blip2Base.train``)."""
    if method != "int8_dynamic":
        raise ValueError(f"quantize_for_inference: method must be int8_dynamic; got {method!r}")
    count = quantize_linear_layers(model.Qformer, method, key="quantize_for_inference", per_channel=True)
    model.Qformer.requires_grad_(False)
    model.qformer_quantization = method
    model.eval()
    return count


def bitsandbytes_config(load_in_8bit: bool, load_in_4bit: bool) -> dict[str, Any]:
    """``from_pretrained`` kwargs for bitsandbytes 8-/4-bit loading; a clear error where it cannot run."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("llm_kwargs: choose one of load_in_8bit and load_in_4bit")
    flag = "load_in_8bit" if load_in_8bit else "load_in_4bit"
    if not torch.cuda.is_available():
        raise ValueError(f"llm_kwargs.{flag} needs a CUDA GPU (bitsandbytes); on this machine use "
                         "llm_kwargs.quantization=int8 (weight-only int8, PyTorch) or int8_dynamic")
    try:
        import bitsandbytes  # noqa: F401  (optional: the quant extra, CUDA only)
    except ImportError as err:
        raise ValueError(f"llm_kwargs.{flag} needs the bitsandbytes package: pip install bitsandbytes "
                         "(or use llm_kwargs.quantization=int8)") from err
    # transformers' model/config modules: seconds to import, loaded on first use
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}
