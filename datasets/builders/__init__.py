"""Dataset builders, registered in ``registry.builders`` on import (nothing heavy is imported)."""
from datasets.builders import (  # noqa: F401  (imports register the builders)
    caption_builders,
    custom_builders,
    laion_builder,
    pair_builders,
    retrieval_builders,
    video_builders,
    vqa_builders,
)
from datasets.builders.base_builder import BaseDatasetBuilder, DatasetBuildError, load_dataset_config

__all__ = ["BaseDatasetBuilder", "DatasetBuildError", "load_dataset_config"]
