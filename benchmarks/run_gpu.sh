# Every single-GPU number of benchmarks/README.md, on one H100 or H200, from the repository root:
#   bash benchmarks/run_gpu.sh RESULTS_DIR [simulation] [gossip] [mpirun] [train]   (no part named: all)
set -e -o pipefail
OUT=${1:?give a folder for the results}; shift
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # when run as root
OPTIMIZERS=no-gossip,power-gossip,power-gossip-2,dpsgd,choco

simulation() {  # targets 1, 3 and 5: 16 workers in one process against the single-model ceiling
  for arch in resnet20 resnet18; do
    python benchmarks/simulation_efficiency.py --architectures $arch --optimizers $OPTIMIZERS --computes loop,vmap,graph \
      --graph-streams 8 --dtypes float32,bfloat16 --json "$OUT/simulation_efficiency_$arch.json" | tee "$OUT/simulation_efficiency_$arch.log"
  done
}
gossip() {  # each algorithm's gossip step alone, timed with a synchronization
  python benchmarks/gossip_cost.py --device cuda --n-workers 16 --json "$OUT/gossip_cost.json" | tee "$OUT/gossip_cost.log"
}
mpirun16() {  # target 2: 16 processes sharing the GPU, Gloo through the host
  mpirun --oversubscribe -np 16 python benchmarks/simulation_efficiency.py --no-ceiling --computes loop,graph --graph-streams 1 \
    --dtypes float32,bfloat16 --optimizers power-gossip --steps 10 --json "$OUT/simulation_mpirun16.json" | tee "$OUT/simulation_mpirun16.log"
}
train() {  # train.py end to end on Fashion-MNIST (carry .data/fashion-mnist to the machine)
  common="task_architecture=resnet20 n_workers=16 device=cuda data_dir=.data/fashion-mnist num_epochs=2 evaluate_each_worker=false optimizer=power-gossip"
  for layout in "loop float32" "graph bfloat16"; do
    set -- $layout
    python train.py $common stacked_compute=$1 dtype=$2 output_dir="$OUT/train_${1}_$2" overwrite=true | tail -2
    python -c "import json, sys; print('$1 $2', json.load(open(sys.argv[1])))" "$OUT/train_${1}_$2/summary.json"
  done | tee "$OUT/train_e2e.log"
}

for part in ${@:-simulation gossip mpirun train}; do
  case $part in
    simulation) simulation ;; gossip) gossip ;; mpirun) mpirun16 ;; train) train ;;
    *) echo "unknown part $part (simulation, gossip, mpirun, train)"; exit 2 ;;
  esac
done
