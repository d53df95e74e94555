# Issue 5 target 4 on a machine with 2 GPUs, from the repository root (carry .data/fashion-mnist):
#   bash benchmarks/run_nccl.sh RESULTS_DIR
# train.py with 16 workers in one process, then in 2 processes (NCCL point-to-point between
# them), for the per-replica loop and the CUDA-graph layout; prints whether every record's
# bits and messages agree.
set -e -o pipefail
OUT=${1:?give a folder for the results}
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # when run as root
common="n_workers=16 device=cuda data_dir=.data/fashion-mnist num_epochs=1 max_batches_per_epoch=20 evaluate_each_worker=false"
for layout in "loop float32" "graph bfloat16"; do
  set -- $layout
  python train.py $common stacked_compute=$1 dtype=$2 output_dir="$OUT/single_$1" overwrite=true | tail -1
  mpirun -np 2 python train.py $common stacked_compute=$1 dtype=$2 output_dir="$OUT/nccl_$1" overwrite=true | grep -v "^\[" | head -1
  python - "$OUT/single_$1" "$OUT/nccl_$1" <<'PY'
import sys, runs
single, nccl = (runs.read_metrics(folder) for folder in sys.argv[1:])
key = lambda r: (r["name"], r["epoch"], sorted(r["tags"].items()), r["bits"], r.get("messages"))
same = [key(r) for r in single] == [key(r) for r in nccl]
gap = max(abs(a["value"] - b["value"]) for a, b in zip(single, nccl) if not a["name"].startswith("time_"))
print(f"{len(single)} records; bits and messages identical: {same}; largest metric difference {gap:.4f}")
PY
done 2>&1 | tee "$OUT/nccl.log"
