#!/usr/bin/env bash
# GPU check: the CUDA-marked tests, then the benchmark at BENCH size and at paper size (random weights), ours next
# to transformers where it has the case. Budget: under 10 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; results in benchmarks/gpu_results/
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU at tiny size (checks the script itself)
#
# Steps (each with its own time limit, so one slow step cannot eat the budget of the others):
#   1. pytest -m gpu: fp16/bf16 autocast steps vs fp32, generation, torchrun --nproc_per_node=1 with NCCL (DDP, FSDP)
#   2. benchmark BENCH, bf16 and fp32: cases a-f, ours and transformers
#   3. benchmark paper size (EVA ViT-g + Q-Former + OPT-2.7B), bf16: stage-1 step (a), stage-2 step (b),
#      generation (d); samples/s = batch / median seconds, peak GPU memory per case
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
out=benchmarks/gpu_results
work=${BENCH_WORK_DIR:-/tmp/blip2_bench}
mkdir -p "$out"

if (( dry_run )); then
    device=cpu; bench=tiny; paper=tiny; threads=1; repeats=1; precisions=fp32; bench_cases=b,f_text
    paper_cases=b; paper_precision=fp32; limit_tests=300; limit_bench=600; limit_paper=400
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
    device=cuda; bench=bench; paper=paper; threads=8; repeats=3; precisions=bf16,fp32
    bench_cases=a,b,c,d,e,f; paper_cases=a,b,d; paper_precision=bf16
    limit_tests=120; limit_bench=150; limit_paper=300
fi

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, record the status, carry on
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s) =="
    local start=$SECONDS status=0
    timeout --signal=INT "$limit" "$@" || status=$?
    echo "== $name: exit $status after $(( SECONDS - start )) s ==" | tee -a "$out/steps.txt"
}

: > "$out/steps.txt"
step "CUDA-marked tests" "$limit_tests" python -m pytest -q -m gpu tests/test_gpu.py
step "benchmark $bench" "$limit_bench" python -m benchmarks.run --config "$bench" --device "$device" \
    --cases "$bench_cases" --precisions "$precisions" --repeats "$repeats" --threads "$threads" \
    --work-dir "$work" --out "$out/bench_$bench.json"
step "benchmark paper size" "$limit_paper" python -m benchmarks.run --config "$paper" --device "$device" \
    --cases "$paper_cases" --precisions "$paper_precision" --repeats "$repeats" --threads "$threads" --no-flops \
    --work-dir "$work" --out "$out/bench_paper_$paper.json"
echo "results: $out/ (steps.txt, bench_*.json)"
! grep -q "exit [1-9]" "$out/steps.txt"
