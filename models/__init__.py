"""BLIP-2 models: importing this package registers every built-in model, encoder, LLM adapter and Q-Former."""
from models import (  # noqa: F401  (imported for registration)
    blip2_opt,
    blip2_qformer,
    blip2_t5,
    frozen_pretrain,
    image_encoders,
    llms,
    qformer,
)
