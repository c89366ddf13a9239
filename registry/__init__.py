"""Name -> component registries that connect the framework's interchangeable parts.

Registering is cheap (a dict insert); the heavy package that fills a registry is imported
only the first time that registry is queried, so ``import registry`` stays instant.

    import registry

    @registry.image_encoders.register("my_vit")
    class MyViT(torch.nn.Module): ...

    encoder_cls = registry.image_encoders.get("my_vit")
"""
from __future__ import annotations

from registry.core import Registry, RegistryError
from registry.plugins import PluginNotFoundError, load_entry_point_plugins, load_plugins

# Each registry names the package whose import fills it (imported lazily on first lookup).
models = Registry("models", home="models")
image_encoders = Registry("image_encoders", home="models")
llms = Registry("llms", home="models")
qformers = Registry("qformers", home="models")
builders = Registry("builders", home="datasets")
tasks = Registry("tasks", home="tasks")
processors = Registry("processors", home="processors")
lr_schedulers = Registry("lr_schedulers", home="runners")
runners = Registry("runners", home="runners")

ALL = {
    r.name: r
    for r in (models, image_encoders, llms, qformers, builders, tasks, processors, lr_schedulers, runners)
}

__all__ = [
    "Registry",
    "RegistryError",
    "load_plugins",
    "PluginNotFoundError",
    "load_entry_point_plugins",
    "ALL",
    *ALL,
]
