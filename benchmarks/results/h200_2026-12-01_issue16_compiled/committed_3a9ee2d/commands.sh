# One H200 call from the working tree of commit 3a9ee2d, clean (the machine's copy of .git is older, so env.txt's
# git status lists the files changed since its 715e8d6); OUT: a folder. Carries .data/fashion-mnist.
mkdir -p $OUT/r
python -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])" > $OUT/r/env.txt
nvidia-smi --query-gpu=name,driver_version --format=csv >> $OUT/r/env.txt
git status --short | grep -v "^??" >> $OUT/r/env.txt
timeout 150 python -m pytest -q -p no:logging tests/test_gpu.py tests/test_fused_kernels.py tests/test_in_process_mixing.py 2>&1 | tail -3 > $OUT/r/tests_gpu.log; cat $OUT/r/tests_gpu.log
timeout 200 python benchmarks/simulation_efficiency.py --architectures resnet18 --computes graph,graph-compiled --graph-streams 8 --dtypes bfloat16 --optimizers no-gossip,power-gossip,power-gossip-2,dpsgd --json $OUT/r/sim_r18.json 2>&1 | grep -v Warn > $OUT/r/sim_r18.log; tail -10 $OUT/r/sim_r18.log
common="task_architecture=resnet20 n_workers=16 device=cuda data_dir=.data/fashion-mnist num_epochs=2 evaluate_each_worker=false optimizer=power-gossip stacked_compute=graph dtype=bfloat16 overwrite=true"
for c in false true; do
  timeout 150 python train.py $common compile_replicas=$c output_dir=$OUT/train_$c > /dev/null 2>&1
  python -c "import json, sys; print('compile_replicas=$c', json.load(open(sys.argv[1])))" $OUT/train_$c/summary.json
done | tee $OUT/r/train_e2e.log
tar czf $OUT/r/train_runs.tgz -C $OUT train_false/metrics.jsonl train_true/metrics.jsonl train_false/config.yaml train_true/config.yaml 2>/dev/null
rm -rf $OUT/train_false $OUT/train_true
