"""BLIP-2 models: importing this package registers every built-in model, encoder, LLM adapter and Q-Former,
and exposes the model zoo (``load_model``, ``load_preprocess``, ``load_model_and_preprocess``, ``model_zoo``)."""
from models import (  # noqa: F401  (imported for registration)
    blip2_opt,
    blip2_qformer,
    blip2_t5,
    blip2_t5_instruct,
    blip2_vicuna_instruct,
    image_encoders,
    llms,
    qformer,
)
from models.checkpoints import load_state_dict_any  # noqa: F401
from models.hf_export import export_to_hf  # noqa: F401
from models.zoo import (  # noqa: F401
    ModelZoo,
    build_model_skeleton,
    load_hf_blip2,
    load_model,
    load_model_and_preprocess,
    load_preprocess,
    model_config_from_hf,
    model_zoo,
)

__all__ = [
    "export_to_hf",
    "load_state_dict_any",
    "ModelZoo",
    "build_model_skeleton",
    "load_hf_blip2",
    "load_model",
    "load_model_and_preprocess",
    "load_preprocess",
    "model_config_from_hf",
    "model_zoo",
]
