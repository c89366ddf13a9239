"""The framework layers know nothing of the demo project (projects/blip2/demo is a plugin on top of them)."""
from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = ("registry", "models", "datasets", "tasks", "processors", "runners")
# The demo's names: its package and entry point, the shapes data set's builders, the frozen-part pre-training
# (models, tasks, modules), and the word "demo" itself.
DEMO_NAMES = re.compile(
    r"\bdemo\b|projects[./]blip2[./]demo|\bshapes_(caption|retrieval|vqa|scenes|text)\b|builders[./]shapes\b"
    r"|frozen_pretrain|frozen_(image_encoder|lm|seq2seq_lm)_pretrain|\b(image_encoder|text_lm)_pretrain\b",
    re.IGNORECASE,
)


def test_no_framework_module_names_the_demo():
    hits = []
    for package in FRAMEWORK:
        for path in sorted((REPO_ROOT / package).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".json") or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if DEMO_NAMES.search(line):
                    hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not hits, "framework modules name the demo project:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_should():
    for line in ("from runners import demo", "import projects.blip2.demo", "registry.builders.get('shapes_vqa')",
                 "from tasks.frozen_pretrain import x", "task: image_encoder_pretrain", "the Demo"):
        assert DEMO_NAMES.search(line), line
    for line in ("tensor shapes", "keys and shapes only", "demonstrated", "pretrained=True"):
        assert not DEMO_NAMES.search(line), line
