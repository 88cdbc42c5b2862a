#!/usr/bin/env bash
# The first run on a CUDA GPU: does everything written for one work, and how fast is it?
#
#     bash benchmarks/gpu_check.sh [WORK_DIR]        # default WORK_DIR: a fresh mktemp -d
#
# 1. the whole chain on the demo digits in bf16 (`python -m pipeline demo --precision bf16`:
#    every stage picks the GPU by itself), in WORK_DIR with its own mlflow.db;
# 2. torchrun with NCCL: a collective on every GPU (one process per GPU, at most 2), then
#    train.py under torchrun on the demo's codes. With one GPU torchrun runs one process, which
#    pipeline/distributed.py runs without a process group: the collective is NCCL's only test;
# 3. the tests marked `cuda` (tests/test_cuda.py), which skip on a machine without a GPU;
# 4. the speed table, fp32 against bf16 (benchmarks/bench_precision.py --device cuda): training
#    steps/s, sampling codes/s for each family, and one 256-code grid autoregressive against
#    absorbing.
# Stops at the first failure (non-zero exit); without a GPU it exits 1 with one line.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was checked" >&2
    exit 1
fi

WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
cd "$WORK"
echo "gpu_check: working in $WORK"
"$PYTHON" - <<'EOF'
import torch
from pipeline.device import resolve_precision
device = torch.device("cuda")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}; --precision auto resolves to "
      f"{resolve_precision('auto', device)}")
EOF

echo
echo "== 1. the whole chain on the demo data, bf16"
start=$SECONDS
"$PYTHON" -m pipeline demo --precision bf16 --data_dir "$WORK/demo_data" \
    --out_dir "$WORK/demo_out" 2>&1 | tee "$WORK/demo.log" | tail -n 12
"$PYTHON" - "$WORK/demo_out/summary.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
assert summary["precision"] == "bf16", summary["precision"]
print(f"demo: {summary['timings']['total_s']:.0f} s, precision {summary['precision']}, "
      f"FD ratio {summary['metrics']['quality/fd_ratio']:.3f}")
EOF
echo "demo wall time: $((SECONDS - start)) s"

echo
echo "== 2. torchrun with NCCL"
NPROC="$("$PYTHON" -c 'import torch; print(min(2, torch.cuda.device_count()))')"
cat > "$WORK/nccl_probe.py" <<'EOF'
import os
import torch
import torch.distributed as dist
rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
value = torch.ones(1, device="cuda")
dist.all_reduce(value)
assert value.item() == dist.get_world_size(), value
if dist.get_rank() == 0:
    print(f"NCCL {torch.cuda.nccl.version()}: all_reduce over "
          f"{dist.get_world_size()} process(es) ok")
dist.destroy_process_group()
EOF
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$WORK/nccl_probe.py"
TOKENIZER_RUN="$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['tokenizer_run_id'])" \
    "$WORK/demo_out/summary.json")"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$REPO/train.py" \
    --run_id "$TOKENIZER_RUN" --codes train --conditional --max_steps 200 --eval_every 100 \
    --checkpoint_every 100 --precision bf16 --experiment gpu-check-torchrun --no-log_model \
    2>&1 | tail -n 4

echo
echo "== 3. tests marked cuda"
(cd "$REPO" && "$PYTHON" -m pytest -q -m cuda tests)

echo
echo "== 4. speed table, fp32 against bf16"
"$PYTHON" -m benchmarks.bench_precision --device cuda --rounds 5
echo
echo "gpu_check: all passed ($((SECONDS)) s); logs and the MLflow store in $WORK"
