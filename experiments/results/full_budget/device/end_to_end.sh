#!/bin/bash
# Call 31's measure of train.py end to end (issue 31, item 3), from the repository root on a GPU:
#   OUT=<folder> UNTIL=500 bash experiments/results/full_budget/device/end_to_end.sh CONFIG DATA_DIR OTHER
# CONFIG: the run's config.yaml (call 31: ../runs/ring8_moniqua_seed2/config.yaml); DATA_DIR: Fashion-MNIST's files;
# OTHER: a folder holding another version's package (git archive REV powergossip | tar -x -C OTHER).
# The GPU tests of the epoch's end's graphs, the blocks and the saves; the benchmark of the same method and layout; the run
# with this tree, then with OTHER's package. Each part is packed into OUT as soon as it ends (a call cut by its
# time limit keeps what ended); UNTIL: the seconds from the start by which the runs end (default 500). Compare the returned runs with
# compare_records.py.
set -u
: "${OUT:?set OUT to the folder the results go to}"; OUT=$(realpath -m "$OUT"); mkdir -p "$OUT"
CONFIG=$(realpath "$1"); DATA=$(realpath "$2"); OTHER=$(realpath "$3"); ROOT=$PWD; W=$(mktemp -d); T0=$(date +%s)
left() { local t=$(( T0 + ${UNTIL:-500} - $(date +%s) )); echo $(( t > 1 ? t : 1 )); }  # at least 1 s
pack() { (cd "$W" && tar czf "$OUT/$1.tgz" "$1"); }
mkdir -p "$W/tests"
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python -c "import sys, torch; print(sys.version); print(torch.__version__, torch.backends.cudnn.version())"
  date -u; lscpu | grep -E "^CPU\(s\)|Model name"; git log --oneline -1; git status --short | grep -v "^ D"; } > "$W/tests/env.txt" 2>&1
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_runs.py \
    -k "graphed_test or graphed_averaged or graphs_of or blocks or first_batch or reads_back" > "$W/tests/test_gpu.log" 2>&1
echo "exit $? at $(( $(date +%s) - T0 )) s" >> "$W/tests/test_gpu.log"
METHOD=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['optimizer'])" "$CONFIG")
timeout 120 python benchmarks/simulation_efficiency.py --n-workers 8 --image-shape 1,28,28 --architectures resnet20 \
    --optimizers "no-gossip,$METHOD" --dtypes bfloat16 --computes graph --graph-streams 8 --steps 60 \
    --json "$W/tests/bench8.json" > "$W/tests/bench8.log" 2>&1
pack tests
keep() { mkdir -p "$W/$1"; cp "runs/$1/metrics.jsonl" "runs/$1/summary.json" "runs/$1/config.yaml" "$W/$1/"; mv "$W/$1.log" "$W/$1/"; pack "$1"; }
timeout "$(left)" python train.py "$CONFIG" output_dir=runs/new overwrite=true data_dir="$DATA" > "$W/new.log" 2>&1; keep new
(cd "$OTHER" && timeout "$(left)" python -m powergossip.train "$CONFIG" output_dir="$ROOT/runs/other" overwrite=true \
    data_dir="$DATA") > "$W/other.log" 2>&1; keep other
