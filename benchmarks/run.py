"""Side-by-side speed and memory benchmark: ours vs Hugging Face `transformers` BLIP-2.

    python -m benchmarks.run                      # BENCH config, ours + transformers, fp32 + bf16
    python -m benchmarks.run --config tiny --repeats 1 --frameworks ours
    python -m benchmarks.run --cases f --frameworks ours,lavis --lavis-python /path/to/lavis-venv/bin/python

Every case runs in its own child process (so peak RSS is per case): 1 warm-up, then the median of
`--repeats` timed calls, then one more call under `FlopCounterMode` for achieved GFLOP/s. The
machine's matmul peak (fp32 and bf16, 2048x2048) is measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "a": ("stage-1 step (ITC+ITM+ITG)", None),
    "b": ("stage-2 OPT step", "opt"),
    "c": ("stage-2 T5 step", "t5"),
    "d": ("OPT generate (5 beams, 30 tokens)", "opt"),
    "e": ("T5 generate (5 beams, 30 tokens)", "t5"),
    "f_image": ("features: image", "retrieval"),
    "f_text": ("features: text", "retrieval"),
    "f_multimodal": ("features: multimodal", "retrieval"),
    "f_itm": ("ITM forward (HF reference for f)", "retrieval"),
    "g": ("retrieval eval (64 img x 320 txt, k 16)", "retrieval"),
    "h_uncached": ("stage-2 OPT epoch, no feature cache", "opt"),
    "h_cached": ("stage-2 OPT epoch, warm feature cache", "opt"),
}
HF_CASES = {"b", "c", "d", "e", "f_image", "f_text", "f_itm", "g"}
OURS_CASES = set(CASES) - {"f_itm"}
LAVIS_CASES = {"f_image", "f_text", "f_multimodal"}  # released LAVIS 1.0.2 in its own venv (benchmarks/lavis_cases.py)


def _checkpoint_kind(case: str) -> str | None:
    return CASES[case][1] if case != "a" else "retrieval"


# ----------------------------------------------------------------------------------- child side
def _setup(spec: dict):
    from benchmarks.bench_config import CONFIGS

    dims = CONFIGS[spec["config"]]
    case, precision, ckpt = spec["case"], spec["precision"], spec["ckpt"]
    if spec["framework"] == "hf":
        from benchmarks import hf_cases as impl

        if case in ("b", "c"):
            return impl.setup_train_step(CASES[case][1], ckpt, dims, precision)
        if case in ("d", "e"):
            return impl.setup_generate(CASES[case][1], ckpt, dims, precision)
        if case == "f_itm":
            return impl.setup_itm_forward(ckpt, dims, precision)
        if case in ("f_image", "f_text"):
            return impl.setup_features(case[2:], ckpt, dims, precision)
        return impl.setup_retrieval(ckpt, dims, precision)
    if spec["framework"] == "lavis":
        from benchmarks import lavis_cases

        return lavis_cases.setup(case, ckpt, dims, precision)
    from benchmarks import ours_cases as impl

    return impl.setup(case, ckpt, dims, precision, spec.get("work_dir"))


def _child(spec: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.text import set_device

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec.get("device", "cpu")
    set_device(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = _setup(spec)
    step()  # warm-up
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    flops, flop_error = None, None
    if spec["count_flops"]:
        try:
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            flops = counter.get_total_flops()
        except (AssertionError, RuntimeError) as err:  # FlopCounterMode's module tracker trips on some generate loops
            flop_error = f"{type(err).__name__}: {err}"
    median = statistics.median(times)
    return {
        "median_s": median,
        "times_s": times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gflop": None if flops is None else flops / 1e9,
        "gflops_per_s": None if flops is None else flops / 1e9 / median,
        "flop_count_error": flop_error,
    }


def _matmul_peak(threads: int, device: str = "cpu") -> dict:
    """Matmul GFLOP/s per dtype on ``device`` (2048^2 on CPU, 8192^2 on CUDA). A CPU without native bf16 emulates
    it (~400x slower than fp32), so there the bf16 rate is taken at 256^2: seconds instead of many minutes."""
    import torch

    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    native_bf16 = cuda or machine_info()["bf16_native"]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 8192 if cuda else (2048 if name == "fp32" or native_bf16 else 256)
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.matmul(a, b)
        sync()
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            torch.matmul(a, b)
            sync()
            count += 1
        out[name] = 2 * n**3 * count / (time.perf_counter() - t0) / 1e9
    return out


# ---------------------------------------------------------------------------------- parent side
def _run_child(spec: dict, timeout: float, python: str | None = None) -> dict:
    """Run one case in a child process: this interpreter, or ``python`` (LAVIS's venv) with this repository on its path."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if python is not None:
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([python or sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": "\n".join(tail) or f"exit {proc.returncode}"}


def _prepare_checkpoints(config: str, kinds: set[str], root: Path) -> dict:
    from benchmarks.bench_config import CONFIGS
    from benchmarks.text import save_word_tokenizer
    from benchmarks.weights import build_checkpoint

    dims, paths = CONFIGS[config], {}
    for kind in sorted(kinds):
        path = build_checkpoint(kind, config, root)
        tok_kind = {"retrieval": "bert"}.get(kind, kind)
        vocab = dims["qformer"]["vocab_size"] if kind == "retrieval" else dims[kind]["vocab_size"]
        vocab_txt = path / "vocab.txt"  # an older run's bert vocabulary was not filled up to the model's
        stale = tok_kind == "bert" and (not vocab_txt.exists() or len(vocab_txt.read_text().splitlines()) != vocab - 1)
        if stale or not (path / "tokenizer_config.json").exists():
            save_word_tokenizer(path, vocab, tok_kind)
        paths[kind] = str(path)
    return paths


def machine_info() -> dict:
    """CPU model, core count, whether the CPU has native bf16 (AVX512-BF16 or AMX), and the CUDA device if any."""
    import platform

    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's lines
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model, flags = fields.get("model name") or platform.processor() or "unknown", set(fields.get("flags", "").split())
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {"cpu": model, "cores": os.cpu_count(), "bf16_native": bool(native), "bf16_flags": native,
            "avx512": "avx512f" in flags,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def _fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", choices=["bench", "tiny", "paper"],
                        help="model dimensions (paper: EVA ViT-g + Q-Former + OPT-2.7B / Flan-T5-XL, random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; timings synchronise the GPU")
    parser.add_argument("--cases", "--case", default="a,b,c,d,e,f_image,f_text,f_multimodal,f_itm,g",
                        help=f"comma-separated subset of {','.join(CASES)}; a letter alone (e.g. `--case f`) "
                             "means every case starting with it")
    parser.add_argument("--frameworks", default="ours,hf",
                        help="ours, hf, lavis (comma-separated); lavis: f_* cases in fp32, needs --lavis-python")
    parser.add_argument("--lavis-python", default=os.environ.get("BLIP2_LAVIS_PYTHON"),
                        help="interpreter of a venv holding salesforce-lavis 1.0.2 (default $BLIP2_LAVIS_PYTHON); "
                             "without one the lavis framework is skipped with a message (docs/benchmarks.md)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="fp32, bf16 (comma-separated); int8 / int8_dynamic: ours only, generation cases, frozen "
                             "LLM quantised (int8_dynamic: the frozen ViT too)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child process")
    parser.add_argument("--no-flops", action="store_true", help="skip the FlopCounterMode pass")
    parser.add_argument("--work-dir", default=None, help="where seeded checkpoints are kept (default: temp)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON output path")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None:  # benchmarks.interleaved: set up once, then one timed call per line read
        import torch

        spec = json.loads(args.serve)
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        step = _setup(spec)
        step()  # warm-up
        print("READY", flush=True)
        for _ in sys.stdin:
            t0 = time.perf_counter()
            step()
            print(f"TIME {time.perf_counter() - t0}", flush=True)
        return 0
    if args.child is not None:
        spec = json.loads(args.child)
        result = _matmul_peak(spec["threads"], spec.get("device", "cpu")) if spec["case"] == "peak" else _child(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.device.startswith("cuda") and "g" in args.cases.split(","):
        parser.error("case g (retrieval) runs on the CPU only")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [name for c in cases for name in ([c] if c in CASES else [n for n in CASES if n.startswith(c + "_")] or [c])]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    frameworks = [f.strip() for f in args.frameworks.split(",")]
    unknown = sorted(set(frameworks) - {"ours", "hf", "lavis"})
    if unknown:
        parser.error(f"unknown framework(s) {unknown}; valid: ours, hf, lavis")
    if "lavis" in frameworks and not (args.lavis_python and Path(args.lavis_python).is_file()):
        print(f"LAVIS skipped: no LAVIS interpreter ({args.lavis_python or 'set --lavis-python or $BLIP2_LAVIS_PYTHON'}"
              f"{' does not exist' if args.lavis_python else ''}); see docs/benchmarks.md to set one up", flush=True)
        frameworks.remove("lavis")
        if not frameworks:
            return 0
    precisions = [p.strip() for p in args.precisions.split(",")]
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "blip2_bench")
    work_dir.mkdir(parents=True, exist_ok=True)

    from benchmarks.bench_config import CONFIGS as dims_by_config

    started = time.time()
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, native bf16: {info['bf16_native']}, CUDA: {info['cuda']}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    peak = _run_child({"case": "peak", "threads": args.threads, "device": args.device}, args.timeout)
    print(f"matmul peak ({args.threads} threads): fp32 {_fmt(peak.get('fp32'), '{:.3g}')} GFLOP/s, "
          f"bf16 {_fmt(peak.get('bf16'), '{:.3g}')} GFLOP/s", flush=True)
    kinds = {_checkpoint_kind(c) for c in cases}
    ckpts = _prepare_checkpoints(args.config, kinds, work_dir)

    rows = []
    load_average = os.getloadavg()

    def save() -> None:
        result = {"config": args.config, "device": args.device, "threads": args.threads, "repeats": args.repeats,
                  "matmul_peak_gflops": peak, "rows": rows, "wall_s": time.time() - started,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "machine": info, "load_average_at_start": load_average}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    for case in cases:
        for precision in precisions:
            row = {"case": case, "what": CASES[case][0], "precision": precision}
            for fw in frameworks:
                if (fw == "hf" and case not in HF_CASES) or (fw == "ours" and case not in OURS_CASES):
                    continue
                if fw == "lavis" and (case not in LAVIS_CASES or precision != "fp32"):
                    continue
                if precision.startswith("int8") and (fw == "hf" or case not in ("d", "e")):
                    continue  # int8: our frozen LLM quantised weight-only, measured on generation
                spec = {"case": case, "framework": fw, "precision": precision, "config": args.config,
                        "ckpt": ckpts[_checkpoint_kind(case)], "repeats": args.repeats, "threads": args.threads,
                        "count_flops": not args.no_flops and not case.startswith("h_"), "device": args.device,
                        "work_dir": str(work_dir / f"{args.config}_cache")}
                row[fw] = _run_child(spec, args.timeout, args.lavis_python if fw == "lavis" else None)
                res = row[fw]
                if res.get("median_s"):
                    per_call = dims_by_config[args.config]["gen_batch" if case in ("d", "e") else "batch"]
                    res["samples_per_s"] = per_call / res["median_s"] if case[0] in "abcdef" else None
                peak_p = peak.get(precision)
                if res.get("gflops_per_s") and peak_p:
                    res["share_of_peak"] = res["gflops_per_s"] / peak_p
                msg = res.get("error", "").splitlines()[-1:] if "error" in res else None
                gpu = f"  peak GPU {res['peak_gpu_gb']:.2f} GB" if res.get("peak_gpu_gb") is not None else ""
                print(f"  {case:<13} {precision:<5} {fw:<5} "
                      + (f"ERROR {msg}" if msg else f"{res['median_s']:.3f} s  peak RSS {res['peak_rss_gb']:.2f} GB"
                         f"{gpu}  {_fmt(res.get('gflops_per_s'), '{:.0f}')} GFLOP/s"), flush=True)
            ours, hf = row.get("ours", {}), row.get("hf", {})
            if precision.startswith("int8"):  # the int8 targets are against transformers' fp32 time in the same run
                hf = next((r.get("hf", {}) for r in rows if r["case"] == case and r["precision"] == "fp32"), {})
            if "median_s" in ours and "median_s" in hf:
                row["ratio_ours_over_hf"] = ours["median_s"] / hf["median_s"]
            if "median_s" in ours and "median_s" in row.get("lavis", {}):
                row["ratio_ours_over_lavis"] = ours["median_s"] / row["lavis"]["median_s"]
            rows.append(row)
            save()  # after every row: a run stopped by a time limit keeps what it measured

    header = f"{'case':<14}{'prec':<6}{'ours s':>9}{'ours GB':>9}{'GFLOP/s':>9}{'%peak':>7}{'hf s':>9}{'hf GB':>8}{'ours/hf':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        o, h = row.get("ours", {}), row.get("hf", {})
        print(f"{row['case']:<14}{row['precision']:<6}{_fmt(o.get('median_s'), '{:.3f}'):>9}"
              f"{_fmt(o.get('peak_rss_gb')):>9}{_fmt(o.get('gflops_per_s'), '{:.0f}'):>9}"
              f"{_fmt(o.get('share_of_peak') and 100 * o['share_of_peak'], '{:.0f}'):>7}"
              f"{_fmt(h.get('median_s'), '{:.3f}'):>9}{_fmt(h.get('peak_rss_gb')):>8}"
              f"{_fmt(row.get('ratio_ours_over_hf'), '{:.2f}x'):>9}"
              + (f"   LAVIS {row['lavis']['median_s']:.3f} s, ours/LAVIS {row['ratio_ours_over_lavis']:.2f}x"
                 if "ratio_ours_over_lavis" in row else ""))
    save()
    print(f"\nwrote {args.out} ({time.time() - started:.0f} s)")
    return 0 if all("error" not in r.get(fw, {}) for r in rows for fw in ("ours", "hf", "lavis")) else 1


if __name__ == "__main__":
    sys.exit(main())
