#!/usr/bin/env bash
# CPU stand-in for the GPU validation of issues #3 and #4, for a machine without a GPU (2 cores suffice).
#
#   bash scripts/cpu_validation.sh ../shared/data results/cpu-validation
#
# Real CIFAR-10-LT rho=100. Lane 1: ldam_drw then erm_cnn (preset short, 50 epochs); lane 2: ldam_drw + SAM 0.8
# (preset short_sam), both lanes at once, one torch thread each, compiled, crop+flip as batched tensor ops.
# When the LDAM-DRW run is done: tiny ViTs for 20 epochs, erm_vit and deitlt distilled from that LDAM-DRW run.
# On 2 shared AMD EPYC cores this took about two hours (docs/validation.md).
set -u
DATA=${1:?data root}
RES=${2:?results folder}
LOG=$RES/logs
mkdir -p "$LOG"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# --yes: the 50-epoch CNN runs are projected past the hour a CPU run starts without asking
D=(--dataset cifar10lt --rho 100 --data-root "$DATA" --results "$RES" --device cpu --workers 0 --quiet --yes)
CNN=(--compile --augment-on device)
run() { local name=$1; shift; local s; s=$(date +%s)
        ltbench run "${D[@]}" "$@" >"$LOG/$name.log" 2>&1; echo "rc=$? wall=$(( $(date +%s) - s ))s" >>"$LOG/$name.log"; }

run ldam_drw_sam --method ldam_drw --preset short_sam "${CNN[@]}" &
( run ldam_drw --method ldam_drw --preset short "${CNN[@]}"; run erm_cnn --method erm_cnn --preset short "${CNN[@]}" ) &
teacher=$(python -c "from ltbench.resolve import make_config; print(make_config('ldam_drw', 'cifar10lt', rho=100, preset='short').run_id)")
while [ ! -f "$RES/runs/$teacher/DONE" ]; do sleep 20; done
run erm_vit --method erm_vit --preset tiny --epochs 20 &
run deitlt --method deitlt --preset tiny --epochs 20 --set drw_epoch=16 --set teacher_run="$teacher" &
wait
ltbench report --results "$RES" --format markdown --heads
