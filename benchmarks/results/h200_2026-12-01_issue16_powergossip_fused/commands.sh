set -x
R_OUT=$OUT/r; mkdir -p $R_OUT
nvidia-smi --query-gpu=name,driver_version --format=csv > $R_OUT/env.txt
python -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])" >> $R_OUT/env.txt
git log -1 --format=%H >> $R_OUT/env.txt 2>/dev/null; git status --short >> $R_OUT/env.txt
timeout 300 python -m pytest -q tests/test_fused_kernels.py tests/test_in_process_mixing.py tests/test_gpu.py 2>&1 | tail -4 > $R_OUT/tests_gpu.log
cat $R_OUT/tests_gpu.log
R="--computes graph --graph-streams 8 --dtypes bfloat16"
EVERY=no-gossip,power-gossip,power-gossip-unfused,power-gossip-2,power-gossip-2-unfused,dpsgd,choco,deepsqueeze,moniqua
for arch in resnet18 resnet20; do
python benchmarks/simulation_efficiency.py --architectures $arch $R --optimizers $EVERY --json $R_OUT/simulation_efficiency_${arch}_bf16.json > $R_OUT/simulation_efficiency_${arch}_bf16.log 2>&1
tail -12 $R_OUT/simulation_efficiency_${arch}_bf16.log
done
for shape in "64 32" "256 8"; do
  set -- $shape
  python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers $1 --batch-size $2 --topology ring --optimizers no-gossip,power-gossip,power-gossip-unfused,dpsgd --computes graph --graph-streams 32 --dtypes bfloat16 --steps 10 --json $R_OUT/many_${1}x${2}_ring.json > $R_OUT/many_${1}x${2}_ring.log 2>&1
  tail -6 $R_OUT/many_${1}x${2}_ring.log
done
python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers 64 --batch-size 32 --no-ceiling --topology one_peer_hypercube --optimizers no-gossip,power-gossip,power-gossip-unfused --computes graph --graph-streams 32 --dtypes bfloat16 --steps 10 --json $R_OUT/many_64x32_one_peer_hypercube.json > $R_OUT/many_64x32_one_peer_hypercube.log 2>&1
tail -5 $R_OUT/many_64x32_one_peer_hypercube.log
tar czf $OUT/results.tgz -C $OUT r && rm -rf $OUT/r
