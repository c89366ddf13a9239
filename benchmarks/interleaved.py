"""Ratios on a busy machine: several variants of one case built in one process and called in turn.

    python -m benchmarks.interleaved --case d --variants ours:fp32,hf:fp32,ours:int8_dynamic --rounds 5

``benchmarks.run`` times each variant in its own process, one after another, so a change of load between them moves
the ratio. Here every round calls each variant once (after one warm-up call each), and the ratio of each variant to
the first is taken per round; the median of those per-round ratios is printed with each variant's median seconds.
Variants: ``ours`` or ``hf`` (``transformers``) with a precision of ``benchmarks.run`` (int8 ones: ours only), built
in this process, or ``lavis:fp32`` (f cases), which runs in a child process of LAVIS's venv (``--lavis-python``) that
times one call each time it is asked.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _served(spec: dict, python: str):
    """A zero-argument callable returning the seconds of one call made by a ``benchmarks.run --serve`` child."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([python, "-m", "benchmarks.run", "--serve", json.dumps(spec)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def reply(prefix: str) -> str:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"the {spec['framework']} child ended before answering (exit {proc.wait()})")

    reply("READY")

    def call() -> float:
        proc.stdin.write("\n")
        proc.stdin.flush()
        return float(reply("TIME "))

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, help="one case of benchmarks.run (a, b, ..., f_text, ...)")
    parser.add_argument("--variants", default="ours:fp32,hf:fp32", help="framework:precision, comma-separated")
    parser.add_argument("--config", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default="/tmp/blip2_bench")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--lavis-python", default=os.environ.get("BLIP2_LAVIS_PYTHON"),
                        help="interpreter of LAVIS's venv, for lavis:fp32 (default $BLIP2_LAVIS_PYTHON)")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.run import _checkpoint_kind, _prepare_checkpoints, _setup, machine_info

    torch.set_num_threads(args.threads)
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    if any(len(v) != 2 or v[0] not in ("ours", "hf", "lavis") for v in variants):
        parser.error(f"--variants: framework:precision with framework ours, hf or lavis, got {args.variants!r}")
    if any(v[0] == "lavis" for v in variants) and not (args.lavis_python and Path(args.lavis_python).is_file()):
        parser.error("lavis variants need --lavis-python (or $BLIP2_LAVIS_PYTHON): a venv with salesforce-lavis")
    kind = _checkpoint_kind(args.case)
    ckpt = _prepare_checkpoints(args.config, {kind}, Path(args.work_dir))[kind]
    timed = {}
    for fw, precision in variants:
        spec = {"framework": fw, "case": args.case, "precision": precision, "config": args.config, "ckpt": ckpt,
                "threads": args.threads}
        if fw == "lavis":
            timed[(fw, precision)] = _served(spec, args.lavis_python)
            continue
        torch.manual_seed(0)
        step = _setup(spec)
        step()  # warm-up

        def call(step=step) -> float:
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        timed[(fw, precision)] = call
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(timed[v]())
    base = variants[0]
    result = {"case": args.case, "config": args.config, "threads": args.threads, "rounds": args.rounds,
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"), "variants": {}}
    for v in variants:
        ratios = [t / b for t, b in zip(times[v], times[base])]
        result["variants"][":".join(v)] = {"times_s": times[v], "median_s": statistics.median(times[v]),
                                           "median_ratio_to_first": statistics.median(ratios)}
        print(f"{':'.join(v):<20} median {statistics.median(times[v]):8.3f} s   "
              f"per-round ratio to {':'.join(base)}: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
