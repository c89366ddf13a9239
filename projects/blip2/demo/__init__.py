"""The offline BLIP-2 demo, a project plugin: synthetic ``shapes`` data, frozen-part pre-training, orchestration.

Importing this package registers its components with the framework's registries, as any plugin does
(``plugins: [projects.blip2.demo]`` in the demo's YAMLs, or ``--plugins projects.blip2.demo``):

- builders ``shapes_caption``, ``shapes_retrieval``, ``shapes_vqa``, ``shapes_scenes``, ``shapes_text``
  (``shapes.py``; default configs in ``configs/``);
- models ``frozen_image_encoder_pretrain``, ``frozen_lm_pretrain``, ``frozen_seq2seq_lm_pretrain``
  (``frozen_models.py``) and tasks ``image_encoder_pretrain``, ``text_lm_pretrain`` (``frozen_tasks.py``).

``python -m projects.blip2.demo [--quick] [--ablation] [--llm t5] ...`` runs the whole demo (``run.py``; tables
and plots in ``report.py``).
"""
from projects.blip2.demo import frozen_models, frozen_tasks, shapes  # noqa: F401  (imported for registration)
