"""Example Q-Former plugin: BLIP-2's Q-Former with a narrower feed-forward network on the query positions.

Registered as ``slim_query_ffn_qformer``; select it with ``model.qformer: slim_query_ffn_qformer`` and set its extra
size in the same ``model.qformer_config`` block (``query_intermediate_size``), which is validated against
``SlimQueryFFNConfig``. Load it with ``plugins: [projects.examples.slim_query_ffn_qformer]`` in a project YAML (or
``--plugins``); everything else (stage 1 / stage 2 models, runners, checkpoints) is unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import registry
from models.qformer import QFormer
from models.qformer_config import QFormerConfig
from models.qformer_layers import QFormerIntermediate, QFormerSelfOutput


@dataclass
class SlimQueryFFNConfig(QFormerConfig):
    query_intermediate_size: int = 256  # width of the query FFN (BLIP-2: intermediate_size, 3072)


@registry.qformers.register("slim_query_ffn_qformer")
class SlimQueryFFNQFormer(QFormer):
    """Query FFNs ``hidden -> query_intermediate_size -> hidden``; text FFNs, attention and names as BLIP-2's."""

    config_class = SlimQueryFFNConfig

    def __init__(self, cfg: SlimQueryFFNConfig | dict | None = None) -> None:
        super().__init__(cfg)
        slim = dataclasses.replace(self.config, intermediate_size=self.config.query_intermediate_size)
        for layer in self.bert.encoder.layer:
            layer.intermediate_query = QFormerIntermediate(slim)
            layer.output_query = QFormerSelfOutput(slim, slim.intermediate_size)
        self.apply(self._init_weights)
        self.tie_weights()
