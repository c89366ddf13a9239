"""Train (or fine-tune) from a project YAML.

    python -m runners.train --cfg projects/blip2/stage2.yaml
        [--options run.batch_size_train=8 model.prompt="a photo of"] [--plugins my.module] [--resume auto]

Multi-process: ``torchrun --nproc_per_node=N -m runners.train --cfg ...`` (multi-node via torchrun's
rendezvous flags, or srun with SLURM's variables). DDP by default (gloo on CPU, nccl on GPU),
``run.fsdp: true`` for sharding. Outputs go to ``run.output_dir/<job>/``: log.jsonl, config.yaml,
checkpoints/step_N (resumable), checkpoint_best, final_metrics.json.
"""
from __future__ import annotations

import sys
from typing import Sequence

from runners.cli import run


def main(argv: Sequence[str] | None = None) -> dict:
    return run(argv, training=True, description=__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
