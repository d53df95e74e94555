# Two calls on one H200 (2026-12-01), from the working tree between 20d8f93 and the commit that added
# compile_replicas (the same StackedReplicas code); env.txt names the tree (its git log shows an older HEAD:
# the machine's copy of .git was not updated, the files were). OUT: a folder.
# call 1 (tests_gpu_compile: a first version of the test compared trajectories over 3 SGD steps and
# failed; compile_numerics.log, from call 2, shows why: the trajectories part, each step from one state agrees)
python compile_check.py | tee $OUT/compile_check.log  # 16 ResNet-18 replicas: 1 graph compiled, no recompiles
python benchmarks/simulation_efficiency.py --architectures resnet18 --computes graph,graph-compiled --graph-streams 8 \
  --dtypes bfloat16 --optimizers no-gossip,power-gossip,power-gossip-2,dpsgd --json $OUT/sim_r18_compiled.json
# call 2
python compile_dbg.py | tee $OUT/compile_numerics.log
python benchmarks/simulation_efficiency.py --architectures resnet20 --computes graph,graph-compiled --graph-streams 8 \
  --dtypes bfloat16 --optimizers no-gossip,power-gossip,power-gossip-2,dpsgd --json $OUT/sim_r20_compiled.json
python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers 64 --batch-size 32 --topology ring \
  --computes graph,graph-compiled --graph-streams 32 --dtypes bfloat16 --steps 10 --optimizers no-gossip,power-gossip,dpsgd \
  --json $OUT/many_64x32_compiled.json
python benchmarks/simulation_efficiency.py --architectures resnet20 --n-workers 256 --batch-size 8 --topology ring --no-ceiling \
  --computes graph-compiled --graph-streams 32 --dtypes bfloat16 --steps 10 --optimizers no-gossip,power-gossip \
  --json $OUT/many_256x8_compiled.json
