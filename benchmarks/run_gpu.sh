# Every single-GPU number of benchmarks/README.md, on one H100 or H200, from the repository root:
#   bash benchmarks/run_gpu.sh RESULTS_DIR [simulation] [many] [candidates] [gossip] [mpirun] [train]   (no part named: all)
set -e -o pipefail
OUT=${1:?give a folder for the results}; shift
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # when run as root
OPTIMIZERS=no-gossip,power-gossip,power-gossip-2,dpsgd,choco
EVERY_METHOD=$OPTIMIZERS,power-gossip-unfused,power-gossip-2-unfused,choco-unfused,choco-exchanged,deepsqueeze,deepsqueeze-unfused,moniqua,moniqua-unfused

simulation() {  # 16 workers in one process against the single-model ceiling; every method in the fast layout
  for arch in resnet20 resnet18; do
    python benchmarks/simulation_efficiency.py --architectures $arch --optimizers $OPTIMIZERS --computes loop,vmap,graph \
      --graph-streams 8 --dtypes float32 --steps 10 --json "$OUT/simulation_efficiency_${arch}_fp32.json" | tee "$OUT/simulation_efficiency_${arch}_fp32.log"
    python benchmarks/simulation_efficiency.py --architectures $arch --optimizers $EVERY_METHOD --computes graph \
      --graph-streams 8 --dtypes bfloat16 --json "$OUT/simulation_efficiency_${arch}_bf16.json" | tee "$OUT/simulation_efficiency_${arch}_bf16.log"
  done
}
many() {  # 2,048 images a step as 64 workers x 32 and 256 x 8, ResNet-20, bf16 graph layout
  for shape in "64 32" "256 8"; do
    set -- $shape
    python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers $1 --batch-size $2 --topology ring \
      --optimizers no-gossip,power-gossip,dpsgd --computes graph,graph-compiled --graph-streams 8,32 --dtypes bfloat16 --steps 10 \
      --json "$OUT/many_${1}x${2}_ring.json" | tee "$OUT/many_${1}x${2}_ring.log"
    python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers $1 --batch-size $2 --no-ceiling \
      --topology one_peer_hypercube --optimizers power-gossip,dpsgd --computes graph --graph-streams 8 --dtypes bfloat16 \
      --steps 10 --json "$OUT/many_${1}x${2}_one_peer_hypercube.json" | tee "$OUT/many_${1}x${2}_one_peer_hypercube.log"
  done
}
candidates() {  # ResNet-18 near the ceiling: cuDNN's algorithm search, compiled replicas, grouped convolutions
  python benchmarks/simulation_efficiency.py --architectures resnet18 --optimizers no-gossip,power-gossip --computes graph \
    --graph-streams 8 --dtypes bfloat16 --cudnn-benchmark --json "$OUT/candidate_cudnn_benchmark.json" | tee "$OUT/candidate_cudnn_benchmark.log"
  python benchmarks/replica_candidates.py --architecture resnet18 --json "$OUT/replica_candidates.json" | tee "$OUT/replica_candidates.log"
  for arch in resnet18 resnet20; do  # the one kept: compile_replicas (graph-compiled) against the graph layout
    python benchmarks/simulation_efficiency.py --architectures $arch --computes graph,graph-compiled --graph-streams 8 \
      --dtypes bfloat16 --optimizers $OPTIMIZERS --json "$OUT/compiled_${arch}.json" | tee "$OUT/compiled_${arch}.log"
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

for part in ${@:-simulation many candidates gossip mpirun train}; do
  case $part in
    simulation) simulation ;; many) many ;; candidates) candidates ;; gossip) gossip ;; mpirun) mpirun16 ;; train) train ;;
    *) echo "unknown part $part (simulation, many, candidates, gossip, mpirun, train)"; exit 2 ;;
  esac
done
