#!/usr/bin/env bash
# GPU validation of the CNN baselines (issue #3), DeiT / DeiT-LT (issue #4) and throughput (issue #6)
# on one H100/H200, as recorded in docs/validation.md and docs/performance.md.
#
#   bash scripts/gpu_validation.sh            # smoke (1 epoch of every method), then the short-recipe runs, then benches
#
# Needs CIFAR-10 under $LTBENCH_DATA: the originals (cifar-10-batches-py/) or a portable subset made with
#   ltbench data export cifar10lt --rho 100 --data-root ../shared/data --out gpu/data
# Everything it measures lands in $OUT (default /tmp/ltbench-gpu): logs, run folders, bench JSON, a report.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/ltbench-gpu}          # what comes back: report.md, summary.txt, all.tar.gz
DATA=${LTBENCH_DATA:-gpu/data}
RES=${RESULTS:-/tmp/ltbench-gpu-results}
WORK=/tmp/ltbench-gpu-work
LOG=$WORK/logs
mkdir -p "$OUT" "$LOG" "$RES"
pack() { tar czf "$OUT/all.tar.gz" -C "$WORK" . 2>/dev/null; tar czf "$OUT/runs.tar.gz" -C "$RES" --exclude='checkpoint.pt' runs 2>/dev/null; }
trap pack EXIT
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$LOG/install.log"; exit 1; }
python3 - <<'PY' | tee "$WORK/env.txt"
import torch, timm, torchvision
print("torch", torch.__version__, "timm", timm.__version__, "torchvision", torchvision.__version__)
print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >>"$WORK/env.txt" 2>&1

D="--dataset cifar10lt --rho 100 --data-root $DATA --quiet"

# ---- 1. smoke: every method for one epoch on the GPU (catches CUDA-only failures in seconds) ----------------
stamp "smoke"
SMOKE=/tmp/ltbench-smoke
pids=()
for spec in "erm_cnn" "ldam_drw --set sam_rho=0.8" "paco --set sam_rho=0.1" "erm_vit" "deit" \
            "deitlt --set teacher=ldam_drw_sam --set drw_epoch=0"; do
  name=${spec%% *}
  # shellcheck disable=SC2086
  ltbench run --method $spec $D --preset tiny --epochs 1 --results $SMOKE >"$LOG/smoke_${name}.log" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
ltbench bench --method deitlt $D --preset tiny --steps 3 --results $SMOKE >"$LOG/smoke_bench.log" 2>&1 || fail=1
if [ $fail -ne 0 ]; then
  stamp "SMOKE FAILED"; for f in "$LOG"/smoke_*.log; do echo "== $f"; tail -15 "$f"; done; exit 1
fi
stamp "smoke passed"

# ---- 2. the short recipes, concurrently on the one GPU -------------------------------------------------------
# Students wait on their teacher's run lock, so every teacher trains once, before its students.
run_bg() { local name=$1; shift; ltbench run --preset short "$@" $D --results "$RES" >"$LOG/$name.log" 2>&1 & }
run_bg erm_cnn --method erm_cnn
run_bg ldam_drw --method ldam_drw
run_bg ldam_drw_sam --method ldam_drw --preset short_sam  # the teacher deitlt reuses
run_bg erm_vit --method erm_vit
sleep 20  # let the teachers take their locks first
run_bg deit --method deit
run_bg deitlt --method deitlt --set teacher=ldam_drw_sam
wait
stamp "short runs done"

# ---- 3. throughput, alone on the GPU ---------------------------------------------------------------------------
for spec in "deitlt --preset paper" "erm_vit --preset paper" "ldam_drw --preset sam" \
            "paco --preset sam" "erm_vit --preset short"; do
  name=$(echo "$spec" | tr ' =' '__')
  # shellcheck disable=SC2086
  timeout 120 ltbench bench --method $spec $D --steps 30 --json >"$WORK/bench_$name.json" 2>"$LOG/bench_$name.log"
  stamp "bench $spec: rc $?"
  python3 - "$WORK/bench_$name.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    b = json.load(open(sys.argv[1]))
    print(sys.argv[1].rsplit("/", 1)[1], {k: b.get(k) for k in (
    "gpu", "images_per_s_end_to_end", "images_per_s_model_only", "end_to_end_over_model_only", "tflops_model_only",
    "data_wait_fraction", "peak_gpu_memory_gib", "images_per_s_eval", "eval_share", "projected_hours")})
except Exception as exc:
    print(sys.argv[1], "no result:", exc)
PY
done

# ---- 4. report -----------------------------------------------------------------------------------------------
ltbench report --results "$RES" --format markdown --compare paper >"$OUT/report.md" 2>"$LOG/report.log"
ltbench report --results "$RES" --format markdown --split paper --heads >>"$OUT/report.md" 2>>"$LOG/report.log"
for run in "$RES"/runs/*/; do
  ltbench eval "$(basename "$run")" --results "$RES" --heads --quiet >>"$OUT/summary.txt" 2>&1
done
stamp "done"
cat "$OUT/report.md"
