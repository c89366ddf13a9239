"""Tasks: what the model is asked to do in a run and how it is scored.

Importing this package registers every built-in task in ``registry.tasks``:
``image_text_pretrain``, ``captioning``, ``vqa``, ``gqa``, ``retrieval``.

    task = registry.tasks.get(cfg.run.task).setup_task(cfg)
"""
import registry
from tasks import (  # noqa: F401  (imported for registration)
    captioning,
    image_text_pretrain,
    retrieval,
    vqa,
)
from tasks.base_task import BaseTask, run_section

__all__ = ["BaseTask", "setup_task"]


def setup_task(cfg) -> BaseTask:
    """The registered task named by ``cfg.run.task``, set up from ``cfg``."""
    name = run_section(cfg).get("task")
    if not name:
        raise KeyError("run.task is missing: name a registered task (e.g. captioning, vqa, retrieval)")
    return registry.tasks.get(name).setup_task(cfg)
