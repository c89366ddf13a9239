"""Evaluate a model on the test splits of a project YAML (run.test_splits, else run.valid_splits).

    python -m runners.evaluate --cfg projects/blip2/eval/caption_coco_opt2.7b_eval.yaml
        [--checkpoint output/<job>/checkpoint_best] [--options run.batch_size_eval=8] [--plugins my.module]

Runs under torchrun like runners.train. Metrics go to run.output_dir/<job>/log.jsonl and
final_metrics.json; the task writes its result files under <job>/result/.
"""
from __future__ import annotations

import sys
from typing import Sequence

from runners.cli import run


def main(argv: Sequence[str] | None = None) -> dict:
    return run(argv, training=False, description=__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
