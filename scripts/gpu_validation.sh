#!/usr/bin/env bash
# The GPU validation of issue #14, sized for one command of at most 10 minutes on one H100/H200:
#   1. `ltbench reproduce cifar10lt-short` (CE, LDAM-DRW, LDAM-DRW+SAM, ERM-ViT, DeiT, DeiT-LT; short presets),
#   2. the throughput targets of docs/performance.md, each compiled run beside its eager baseline,
#   3. `ltbench reproduce cifar10lt-cnn-paper` (the 200-epoch CNN recipes) with whatever time is left.
# Every phase is time-boxed from BUDGET_S; runs resume, so the next GPU session continues where this one stopped.
#
# Before (on the development machine; gpu/ is git-ignored, carry it):
#   ltbench data export cifar10lt --rho 100 --data-root ../shared/data --out gpu/data
# On the GPU machine (results come back under $OUT):
#   bash scripts/gpu_validation.sh
# Afterwards, keep what came back so the next GPU run continues (run folders without checkpoints over 16 MiB,
# bench JSON, verdicts; a bench already measured is not repeated, a finished run is reused):
#   mkdir -p results/validation && tar xzf <files_at>/validation/state.tar.gz -C results/validation
# CPU rehearsal of the very same commands (synthetic data, CPU, one epoch, tiny data, no compiling), within the GPU
# budget x 4 (36 minutes; a rerun with the same RESULTS keeps the benches it measured and is shorter):
#   DRY=1 OUT=/tmp/gpu-dry RESULTS=/tmp/gpu-dry-results bash scripts/gpu_validation.sh
set -u
export PYTHONUNBUFFERED=1
# the whole script; the command limit is 600 s. DRY: x 4, as every cap below (with 540 s the CPU benches alone
# would use it all and the suites would never be rehearsed)
BUDGET_S=${BUDGET_S:-$([ "${DRY:-0}" = 1 ] && echo 2160 || echo 540)}
OUT=${OUT:-/tmp/ltbench-gpu}
RESULTS=${RESULTS:-results/validation}     # resumable run folders (a previous session's, unpacked here)
DATA=${LTBENCH_DATA:-gpu/data}
DRY=${DRY:-0}
V=$OUT/validation
mkdir -p "$V/logs" "$RESULTS/bench"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$V/timeline.txt"; }
pack() {  # small, plain files under $OUT: verdicts, bench JSON, logs, and the state the next session continues
  cp -r "$RESULTS/reproduce" "$RESULTS/bench" "$V/" 2>/dev/null
  python3 - "$RESULTS" "$V/state.tar.gz" <<'PY'
# Every run folder file but checkpoints; a checkpoint only where the next session needs it (an unfinished run
# resumes from it, or distils from it as its teacher) and only up to 16 MiB (ResNet-32 yes, ViTs restart).
import json, sys, tarfile
from pathlib import Path
from ltbench.config import RunConfig
from ltbench.registry import METHODS
results, needed = Path(sys.argv[1]), set()
for folder in (results / "runs").glob("*/"):
    if (folder / "DONE").is_file() or not (folder / "config.json").is_file():
        continue
    config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    needed |= {folder.name, *(getattr(ref, "run_id", ref) for ref in METHODS.get(config.method).requires(config).values())}
with tarfile.open(sys.argv[2], "w:gz") as tar:
    for path in sorted(p for part in ("runs", "bench", "reproduce") for p in (results / part).rglob("*") if p.is_file()):
        big = path.stat().st_size > 16 * 2**20
        if path.name == "checkpoint.pt" and (path.parent.name not in needed or big) or path.name.startswith("."):
            continue
        tar.add(path, arcname=str(path.relative_to(results)))
PY
}
trap pack EXIT

if [ "$DRY" = 1 ]; then  # the same commands, made CPU-sized: synthetic data, one epoch, no compiling, no GPU
  SUITE_ARGS=(--datasets synthetic --epochs 1 --device cpu --gpus-per-trial 0 --cpus-per-trial 1 --no-compile
              --set workers=0 --set data.n_max=100 --set data.n_test=4 --yes)  # rho 100 keeps one image of the rarest
  SHORT_ARGS=(--set deit:teacher_overrides=epochs=1 --set deitlt:teacher_overrides=epochs=1)
  DATASET=(--dataset synthetic --device cpu --workers 0)
  STEPS_SMALL=2; STEPS_LARGE=1; COMPILE=(); GRAPHS=(); MICRO=(--micro-batch 2 --set batch_size=4 --set img_size=32 --set sched_released_layout=)
  CNN_BATCH=(--set batch_size=16)
  CAP_SCALE=4  # the CPU is slower than the GPU at everything
else
  [ -d "$DATA" ] || { echo "no data under $DATA: run the export command in this script's header and carry gpu/"; exit 2; }
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$V/logs/install.log" 2>&1 \
    || { echo "install failed"; tail -20 "$V/logs/install.log"; exit 1; }
  SUITE_ARGS=(--data-root "$DATA" --yes); SHORT_ARGS=()  # --yes: never stopped by the CPU guard where no GPU shows
  DATASET=(--dataset cifar10lt --rho 100 --data-root "$DATA")
  STEPS_SMALL=100; STEPS_LARGE=10; COMPILE=(--compile); GRAPHS=(--compile --compile-mode reduce-overhead)
  MICRO=(--micro-batch 256); CNN_BATCH=(); CAP_SCALE=1
fi
python3 - <<'PY' | tee "$V/env.txt"
import torch, timm, torchvision
print("torch", torch.__version__, "timm", timm.__version__, "torchvision", torchvision.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY

# reproduce SUITE SECONDS [ARGS]: train for at most SECONDS (Ctrl-C at the deadline: finished epochs are kept),
# then write the verdict of what is there.
reproduce() {
  local suite=$1 seconds=$2; shift 2
  local rc=none log=$V/logs/$suite.log
  stamp "reproduce $suite: up to ${seconds}s"
  if [ "$seconds" -gt 30 ]; then
    timeout -s INT -k 30 "$seconds" ltbench reproduce "$suite" --results "$RESULTS" --quiet "${SUITE_ARGS[@]}" "$@" \
      >"$log" 2>&1
    rc=$?
  fi
  if ! grep -q "^verdict: " "$log" 2>/dev/null; then  # stopped before writing its verdict: judge what is there
    log=$V/logs/$suite.verdict.log
    ltbench reproduce "$suite" --results "$RESULTS" --no-train "${SUITE_ARGS[@]}" "$@" >"$log" 2>&1
  fi
  stamp "reproduce $suite: rc $rc, verdict $(grep -m1 -o '[0-9]*/[0-9]* pass' "$log" || echo 'not written')"
}

# bench NAME SECONDS ARGS...: one `ltbench bench --json` into $RESULTS/bench/NAME.json, at most SECONDS; a bench
# a previous session measured on the same GPU model is kept, not repeated
GPU_NAME=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
if [ "$(cat "$RESULTS/bench/DEVICE" 2>/dev/null)" != "$GPU_NAME" ]; then  # never pair timings of two GPU models
  rm -f "$RESULTS"/bench/*.json; echo "$GPU_NAME" >"$RESULTS/bench/DEVICE"
fi
BENCHES=(ldam_sam_eager ldam_sam_graphs deitlt_paper_eager deitlt_paper_compiled)
BENCH_S=$(( 330 * CAP_SCALE ))  # their caps below, together
bench() {
  local name=$1 cap=$(( $2 * CAP_SCALE )); shift 2
  local file=$RESULTS/bench/$name.json seconds=$(( $(left) - 30 < cap ? $(left) - 30 : cap ))
  if [ -s "$file" ]; then stamp "bench $name: measured before, kept"; return; fi
  if [ "$seconds" -lt 20 ]; then stamp "bench $name: skipped (no time left)"; return; fi
  timeout -k 10 "$seconds" ltbench bench "$@" "${DATASET[@]}" --json >"$file.part" 2>"$V/logs/bench_$name.log"
  local rc=$?
  if [ $rc -eq 0 ]; then mv "$file.part" "$file"; else rm -f "$file.part"; fi
  stamp "bench $name: rc $rc"
}
benches_pending() { local n; for n in "${BENCHES[@]}"; do [ -s "$RESULTS/bench/$n.json" ] || return 0; done; return 1; }

# ---- 1. the short suite (leaving the benches their time while any is still unmeasured) ---------------------
if benches_pending; then reproduce cifar10lt-short $(( $(left) - BENCH_S - 20 )) "${SHORT_ARGS[@]}"; else
  reproduce cifar10lt-short $(( $(left) - 60 )) "${SHORT_ARGS[@]}"; fi

# ---- 2. throughput: each compiled bench beside its eager baseline, alone on the GPU ------------------------
python3 - "$RESULTS/bench/matmul_peak.json" "$DRY" <<'PY'
import json, sys, time, torch
dry = sys.argv[2] == "1"
device, n, reps = ("cpu", 512, 3) if dry else ("cuda", 8192, 50)
a = torch.randn(n, n, device=device, dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
if device == "cuda": torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(reps): a @ b
if device == "cuda": torch.cuda.synchronize()
json.dump({"n": n, "tflops_bf16_matmul": 2 * n**3 * reps / (time.perf_counter() - t) / 1e12}, open(sys.argv[1], "w"))
PY
stamp "matmul peak: rc $?"
bench ldam_sam_eager 45 --method ldam_drw --preset sam --steps "$STEPS_SMALL" "${CNN_BATCH[@]}"
bench ldam_sam_graphs 75 --method ldam_drw --preset sam --steps "$STEPS_SMALL" "${CNN_BATCH[@]}" "${GRAPHS[@]}"
bench deitlt_paper_eager 60 --method deitlt --preset paper "${MICRO[@]}" --steps "$STEPS_LARGE"
bench deitlt_paper_compiled 150 --method deitlt --preset paper "${MICRO[@]}" --steps "$STEPS_LARGE" "${COMPILE[@]}" \
  --pipeline
python3 - "$RESULTS/bench" <<'PY' | tee "$V/throughput.md"
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
def num(report, key, spec=",.0f"):
    return "not measured" if report is None or report.get(key) is None else format(report[key], spec)
peak = (load("matmul_peak") or {}).get("tflops_bf16_matmul")
eager, graphs = load("ldam_sam_eager"), load("ldam_sam_graphs")
vit_eager, vit = load("deitlt_paper_eager"), load("deitlt_paper_compiled")
print("| target | eager | compiled | met |\n|---|---|---|---|")
ips = graphs and graphs["images_per_s_end_to_end"]
print(f"| ResNet-32 LDAM-DRW+SAM >= 20,000 img/s (CUDA graphs) | {num(eager, 'images_per_s_end_to_end')} | "
      f"{num(graphs, 'images_per_s_end_to_end')} | {'n/a' if ips is None else ips >= 20000} |")
share = vit and peak and vit["tflops_model_only"] / peak
print(f"| DeiT-B/16 student step >= 50 % of the bf16 matmul peak ({num({'p': peak}, 'p', '.0f')} TFLOP/s) | "
      f"{num(vit_eager, 'tflops_model_only', '.0f')} TFLOP/s | {num(vit, 'tflops_model_only', '.0f')} TFLOP/s | "
      f"{'n/a' if not share else f'{100 * share:.0f} %: {share >= 0.5}'} |")
ratio = vit and vit["end_to_end_over_model_only"]
print(f"| end to end >= 0.9 x model-only | {num(vit_eager, 'end_to_end_over_model_only', '.2f')} | "
      f"{num(vit, 'end_to_end_over_model_only', '.2f')} | {'n/a' if ratio is None else ratio >= 0.9} |")
hours = vit and vit.get("pipeline_projected_hours")
print(f"| full CIFAR-10-LT DeiT-LT pipeline <= 1.5 h | - | {num(vit, 'pipeline_projected_hours', '.2f')} h | "
      f"{'n/a' if hours is None else hours <= 1.5} |")
print(f"\ndevice: {(vit or graphs or {}).get('gpu') or (vit or graphs or {}).get('device')}")
PY

# ---- 3. the 200-epoch CNN recipes, as far as the time allows ---------------------------------------------
reproduce cifar10lt-cnn-paper $(( $(left) - 45 ))
stamp "done"
cat "$V/timeline.txt"
