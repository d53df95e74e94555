"""Golden runs: a fixed list of tiny runs of train.py and gossip_run.py whose metrics are kept
in tests/golden/ and compared bit for bit after a change that should not change any number.

    python tests/golden_runs.py OUT                    # every case, all workers in this one process
    mpirun -np 2 python tests/golden_runs.py OUT       # the same cases, 2 processes
    python tests/golden_runs.py --save OUT tests/golden         # keep OUT's comparable lines as the golden files
    python tests/golden_runs.py --compare tests/golden OUT      # list the differences (exit 1 if any)
    python tests/golden_runs.py --compare tests/golden OUT 1e-4 # the same, values within a relative tolerance
    python tests/golden_runs.py --arithmetic                    # this machine's arithmetic fingerprint

A run writes OUT/<layout>/<case>/metrics.jsonl (and the run's other files), where <layout> is
"one-process" or "mpirun-<N>" (N processes); the golden files are
tests/golden/<layout>/<case>.jsonl, the comparable lines only (`comparable_lines`).

Only the user-facing interface is used, the one that stays when the code moves:
`import train` / `import gossip_run` from the repository root, `module.config` (a fresh copy
of its defaults, taken when the module is imported, updated with the case's keys),
`module.output_dir`, then `module.main()`. All cases of a layout run in one process, one
after the other, each from freshly seeded random generators (torch, numpy, random), on one
thread, on the CPU, in float32. The training cases read a tiny Fashion-MNIST in the real IDX
format that this script writes itself (no download). Every layout writes the same records (the
README's layout contract); each layout keeps its own golden files, so that a change that parts
the layouts shows which one moved.

Set GOLDEN_EXPECT_ROOT=/path/to/checkout to have the script fail unless `powergossip`,
`train` and `gossip_run` are imported from that checkout (an editable install of another
checkout would otherwise win where this one is not first on sys.path).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the cases --------------------------------------------------------------------------------------
N_WORKERS = 4  # divisible by 1 and 2 (the two layouts)
FAKE_DATA = {"n_train": 128, "n_test": 48, "seed": 0}  # tiny Fashion-MNIST-shaped data (written by this script)

TRAIN_COMMON = {
    "task": "fashion_mnist", "task_architecture": "small_cnn", "n_workers": N_WORKERS, "batch_size": 8,
    "num_epochs": 2, "max_batches_per_epoch": 2, "distributed_lr_warmup_epoch": 0, "lr_schedule_milestones": [[1, 0.5]],
    "device": "cpu", "dtype": "float32", "stacked_compute": "loop", "seed": 3, "checkpoint_every": 0,
    # data_dir: set at run time (the fake data's folder)
}
GOSSIP_COMMON = {
    "n_workers": N_WORKERS, "matrix_size": 6, "num_steps": 20, "data_type": "random", "device": "cpu", "seed": 42,
}

# (name, entrypoint, the case's keys); names are stable: they name the golden files.
CASES: list[tuple[str, str, dict]] = [
    # train.py: every registered method on a ring
    ("train-all-reduce-ring", "train", {"optimizer": "all-reduce", "topology": "ring"}),
    ("train-dpsgd-ring", "train", {"optimizer": "dpsgd", "topology": "ring"}),
    ("train-power-gossip-ring", "train", {"optimizer": "power-gossip", "topology": "ring", "optimizer_num_iterations": 2}),
    ("train-choco-ring", "train", {"optimizer": "choco", "topology": "ring", "optimizer_compressor": "sign-and-norm",
                                   "optimizer_diffusion_rate": 0.4}),
    ("train-deepsqueeze-ring", "train", {"optimizer": "deepsqueeze", "topology": "ring", "optimizer_diffusion_rate": 0.05}),
    ("train-moniqua-ring", "train", {"optimizer": "moniqua", "topology": "ring", "optimizer_diffusion_rate": 0.05,
                                     "optimizer_theta": 0.5}),
    ("train-powersgd-ring", "train", {"optimizer": "powersgd", "topology": "ring", "optimizer_rank": 2,
                                      "optimizer_start_compressing_after_num_steps": 1}),
    ("train-push-sum-ring", "train", {"optimizer": "push-sum", "topology": "ring"}),
    # train.py: graphs over time
    ("train-dpsgd-one_peer_exponential", "train", {"optimizer": "dpsgd", "topology": "one_peer_exponential"}),
    ("train-power-gossip-random_matching", "train", {"optimizer": "power-gossip", "topology": "random_matching"}),
    ("train-push-sum-one_peer_exponential", "train", {"optimizer": "push-sum", "topology": "one_peer_exponential",
                                                      "local_steps": 2}),
    # gossip_run.py: every method that gossips parameters (powersgd averages gradients: not here)
    ("gossip-all-reduce-ring", "gossip_run", {"algorithm": "all-reduce", "topology": "ring"}),
    ("gossip-dpsgd-ring", "gossip_run", {"algorithm": "dpsgd", "topology": "ring"}),
    ("gossip-power-gossip-ring", "gossip_run", {"algorithm": "power-gossip", "topology": "ring", "optimizer_rank": 2}),
    ("gossip-choco-ring", "gossip_run", {"algorithm": "choco", "topology": "ring", "optimizer_compressor": "sign-and-norm",
                                         "optimizer_diffusion_rate": [0.05, 0.5]}),
    ("gossip-choco-qsgd-ring", "gossip_run", {"algorithm": "choco", "topology": "ring", "optimizer_compressor": "qsgd",
                                              "optimizer_diffusion_rate": 0.3}),
    ("gossip-deepsqueeze-ring", "gossip_run", {"algorithm": "deepsqueeze", "topology": "ring", "optimizer_diffusion_rate": 0.2}),
    ("gossip-moniqua-ring", "gossip_run", {"algorithm": "moniqua", "topology": "ring", "optimizer_diffusion_rate": 0.1,
                                           "optimizer_theta": [2.0, 8.0]}),  # theta=8 diverges: the stop is recorded
    ("gossip-push-sum-ring", "gossip_run", {"algorithm": "push-sum", "topology": "ring"}),
    # gossip_run.py: graphs over time
    ("gossip-dpsgd-one_peer_exponential", "gossip_run", {"algorithm": "dpsgd", "topology": "one_peer_exponential"}),
    ("gossip-power-gossip-random_matching", "gossip_run", {"algorithm": "power-gossip", "topology": "random_matching",
                                                           "optimizer_edge_memory": 1}),
    ("gossip-push-sum-one_peer_exponential", "gossip_run", {"algorithm": "push-sum", "topology": "one_peer_exponential"}),
]
CASE_NAMES = [name for name, _, _ in CASES]


# --- what is compared -------------------------------------------------------------------------------
def is_wall_clock(record: dict) -> bool:
    """A record that measures time on this machine: train.py's `time_<section>` records (split
    "runtime"). Every other record holds no clock reading: train.py's records are name, value,
    epoch (a count), bits, messages and tags; `communication_time_model` (split "network_model")
    is seconds *modelled* from bits and messages, deterministic, so it stays; gossip_run.py's
    records are name, step, value, bits, messages and tags. Nothing else is dropped."""
    return record.get("tags", {}).get("split") == "runtime"


def comparable_lines(path: str) -> list[str]:
    """The lines of a metrics.jsonl (or of a golden file) without the wall-clock records, each
    as written (no trailing newline): the text is compared, so equal means bit-identical."""
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip() and not is_wall_clock(json.loads(line))]


def _case_file(folder: str, layout: str, case: str) -> str | None:
    """A case's metrics in `folder`: a golden file <layout>/<case>.jsonl or a run's <layout>/<case>/metrics.jsonl."""
    for path in (os.path.join(folder, layout, f"{case}.jsonl"), os.path.join(folder, layout, case, "metrics.jsonl")):
        if os.path.isfile(path):
            return path
    return None


def layouts_in(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("_")) \
        if os.path.isdir(folder) else []


def _close(want: str, got: str, first_values: dict, relative_tolerance: float) -> bool:
    """Two records alike but for their value, which differs by at most `relative_tolerance` of
    the larger of the two values, plus FLOOR_TOLERANCE of the first value of its series (same
    name and tags; gossip_run's final_error is the last of its error series): float32
    round-off, with room for a value that has decayed to near zero from where it started, but
    not for a change of a late value of a decaying curve. A value that is not a finite number
    must be the same."""
    want, got = json.loads(want), json.loads(got)
    a, b = want.pop("value", None), got.pop("value", None)
    if want != got:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (a, b)):
        return a == b or (a != a and b != b)  # NaN is NaN
    name = want.get("name", "").removeprefix("final_")
    series = json.dumps([name, want.get("tags")], sort_keys=True)
    start = abs(first_values.setdefault(series, a))
    return abs(a - b) <= relative_tolerance * max(abs(a), abs(b)) + FLOOR_TOLERANCE * start


def compare(expected_dir: str, actual_dir: str, layouts: list[str] | None = None, cases: list[str] | None = None,
            relative_tolerance: float | None = None) -> list[str]:
    """Differences between two result folders (golden files or run outputs, either form; see
    `_case_file`), for every layout of `expected_dir` (or `layouts`) and every case of CASES
    (or `cases`): a line per case that is missing or differs, naming the first differing line.
    An empty list: identical, bit for bit; with `relative_tolerance`, every record the same but
    for values within that tolerance (`_close`: for a machine whose arithmetic differs)."""
    differences = []
    for layout in layouts if layouts is not None else layouts_in(expected_dir):
        for case in cases if cases is not None else CASE_NAMES:
            want_path, got_path = _case_file(expected_dir, layout, case), _case_file(actual_dir, layout, case)
            if want_path is None or got_path is None:
                differences.append(f"{layout}/{case}: no metrics in {expected_dir if want_path is None else actual_dir}")
                continue
            want, got = comparable_lines(want_path), comparable_lines(got_path)
            if want == got:
                continue
            first_values = {}
            same = (lambda a, b: a == b) if relative_tolerance is None else \
                (lambda a, b: _close(a, b, first_values, relative_tolerance))
            first = next((k for k, (a, b) in enumerate(zip(want, got)) if not same(a, b)), min(len(want), len(got)))
            if first == len(want) == len(got):
                continue
            differences.append(f"{layout}/{case}: {len(got)} comparable lines, expected {len(want)}; first difference at "
                               f"comparable line {first + 1}:\n  expected: {want[first] if first < len(want) else '<none>'}"
                               f"\n  actual:   {got[first] if first < len(got) else '<none>'}")
    return differences


def save(out_dir: str, golden_dir: str) -> list[str]:
    """Write the comparable lines of every run in `out_dir` (every layout) to golden_dir/<layout>/<case>.jsonl,
    and the machine's arithmetic that the runs recorded (`this_machine`) to golden_dir/ARITHMETIC.json."""
    machines = {json.dumps(recorded_arithmetic(os.path.join(out_dir, layout)), sort_keys=True) for layout in layouts_in(out_dir)}
    if len(machines) != 1 or machines == {"{}"}:
        raise ValueError(f"{out_dir}: the layouts were not run on one machine (or not by run_cases): {sorted(machines)}")
    os.makedirs(golden_dir, exist_ok=True)
    with open(os.path.join(golden_dir, ARITHMETIC_FILE), "w") as f:
        f.write(json.dumps(json.loads(machines.pop()), indent=1) + "\n")
    written = [os.path.join(golden_dir, ARITHMETIC_FILE)]
    for layout in layouts_in(out_dir):
        for case in CASE_NAMES:
            source = _case_file(out_dir, layout, case)
            if source is None:
                raise FileNotFoundError(f"{out_dir}/{layout}/{case}/metrics.jsonl is missing")
            os.makedirs(os.path.join(golden_dir, layout), exist_ok=True)
            target = os.path.join(golden_dir, layout, f"{case}.jsonl")
            with open(target, "w") as f:
                f.writelines(line + "\n" for line in comparable_lines(source))
            written.append(target)
    return written


# --- this machine's arithmetic -----------------------------------------------------------------------
ARITHMETIC_FILE = "ARITHMETIC.json"  # in the golden folder: the fingerprint of the machine that recorded the files
RELATIVE_TOLERANCE = 1e-5  # where this machine's arithmetic differs (see compare): of the value itself
FLOOR_TOLERANCE = 1e-8  # ... plus this much of its series' first value (a curve that decays to round-off)


def arithmetic_fingerprint() -> str:
    """A hash of the bits that this machine and torch build give for the kinds of operation the
    golden runs use, on one thread: convolution and linear layers forward and backward,
    cross-entropy, matrix products, reductions, QR, elementwise updates in float32 and float64.
    The same float operations differ in their last bits from one CPU to another (vector width:
    AVX2 or AVX-512, fused multiply-adds, the BLAS and oneDNN kernels chosen for the CPU) and
    from one torch release to another: two machines with one fingerprint compute the cases bit
    for bit alike. Nothing of the project is used, so a change to the project cannot change it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fingerprint_on_one_thread()
    finally:
        torch.set_num_threads(threads)


def _fingerprint_on_one_thread() -> str:
    import hashlib

    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x, y = rand(8, 1, 28, 28), torch.randint(0, 10, (8,), generator=g)
    w1, w2, w3 = (rand(*shape).requires_grad_() for shape in [(16, 1, 5, 5), (32, 16, 5, 5), (10, 512)])
    hidden = F.max_pool2d(F.relu(F.conv2d(F.max_pool2d(F.relu(F.conv2d(x, w1)), 2), w2)), 2)
    logits = F.linear(hidden.flatten(1), w3)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    results = [hidden, logits, loss, w1.grad, w2.grad, w3.grad]
    for dtype in (torch.float32, torch.float64):
        a, b, c = rand(1003, dtype=dtype), rand(1003, dtype=dtype), rand(1003, dtype=dtype)
        rows = rand(4, 1000, dtype=dtype)
        results += [torch.bmm(rand(4, 6, 6, dtype=dtype), rand(4, 6, 2, dtype=dtype)),
                    rand(37, 129, dtype=dtype) @ rand(129, 11, dtype=dtype), torch.linalg.qr(rand(30, 3, dtype=dtype))[0],
                    torch.linalg.svd(rand(3, 9, 5, dtype=dtype), full_matrices=False)[0].abs(),
                    rows.sum(1), rows.sum(), rows.mean(0), rows.pow(2).sum(1), torch.linalg.vector_norm(rows, dim=1),
                    torch.dot(a, b), a.cumsum(0), a.add(b, alpha=-0.0731), a.addcmul(b, c, value=0.3), a.lerp(b, 0.37),
                    torch.exp(a), torch.log(a.abs() + 1), torch.tanh(a), a / (b.abs() + 0.5), a.abs().sqrt(),
                    a.abs().pow(1.5), torch.round(a * 3.7), torch.log_softmax(rand(7, 10, dtype=dtype), dim=1),
                    F.batch_norm(rand(8, 4, 5, 5, dtype=dtype), None, None, training=True)]
    digest = hashlib.blake2b(torch.__version__.encode(), digest_size=8)
    for result in results:
        digest.update(result.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def recorded_arithmetic(golden_dir: str) -> dict:
    """A folder's ARITHMETIC.json (the golden folder's, or a layout's in a run's output): the
    fingerprint, CPU and torch of the machine that computed its records; {} if there is none."""
    path = os.path.join(golden_dir, ARITHMETIC_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def this_machine() -> dict:
    import platform

    import torch

    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"fingerprint": arithmetic_fingerprint(), "cpu": cpu, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# --- running ------------------------------------------------------------------------------------------
_MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def layout_and_rank() -> tuple[str, int]:
    size = next((int(os.environ[v]) for v in _MPI_SIZE_VARIABLES if v in os.environ), 1)
    rank = next((int(os.environ[v]) for v in _MPI_RANK_VARIABLES if v in os.environ), 0)
    return ("one-process" if size == 1 else f"mpirun-{size}"), rank


def write_fake_fashion_mnist(folder: str, n_train: int, n_test: int, seed: int) -> str:
    """The four Fashion-MNIST IDX files (uncompressed) with seeded uniform pixels and labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        magic = 0x0800 + array.ndim  # unsigned bytes, ndim dimensions
        header = np.array([magic, *array.shape], dtype=">i4").tobytes()
        path = os.path.join(folder, name)
        with open(f"{path}.{os.getpid()}", "wb") as f:  # every process writes the same bytes: replaced whole
            f.write(header + array.tobytes())
        os.replace(f"{path}.{os.getpid()}", path)
    return folder


def _check_root(modules) -> None:
    expected = os.environ.get("GOLDEN_EXPECT_ROOT")
    if not expected:
        return
    expected = os.path.realpath(expected) + os.sep
    for module in modules:
        where = os.path.realpath(module.__file__)
        if not where.startswith(expected):
            raise RuntimeError(f"GOLDEN_EXPECT_ROOT={expected}: {module.__name__} was imported from {where}")


def _reseed(seed: int = 0) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_cases(out_root: str, names: list[str] | None = None) -> str:
    """Run the cases (all, or `names`) of this process's layout into out_root/<layout>/<case>/; returns out_root/<layout>."""
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported (when run as a script, it is not yet)
    if sys.path[:1] != [ROOT]:
        sys.path.insert(0, ROOT)  # this checkout's train.py, gossip_run.py and powergossip, before any installed one
    import torch

    torch.set_num_threads(1)
    import powergossip
    import gossip_run
    import train

    _check_root([powergossip, train, gossip_run])
    defaults = {"train": copy.deepcopy(train.config), "gossip_run": copy.deepcopy(gossip_run.config)}
    modules = {"train": train, "gossip_run": gossip_run}
    layout, rank = layout_and_rank()
    folder = os.path.join(out_root, layout)
    data_dir = write_fake_fashion_mnist(os.path.join(out_root, "_data", "fashion-mnist"), **FAKE_DATA)
    unknown = sorted(set(names or []) - set(CASE_NAMES))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; known: {', '.join(CASE_NAMES)}")
    if rank == 0:
        print(f"golden runs, layout {layout}: powergossip from {os.path.dirname(os.path.realpath(powergossip.__file__))}, "
              f"train from {os.path.realpath(train.__file__)}, gossip_run from {os.path.realpath(gossip_run.__file__)}", flush=True)
    if rank == 0:  # the machine that computes these records (compare: bit for bit only on the same arithmetic)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ARITHMETIC_FILE), "w") as f:
            json.dump(this_machine(), f)
    for name, entrypoint, keys in CASES:
        if names is not None and name not in names:
            continue
        module = modules[entrypoint]
        config = copy.deepcopy(defaults[entrypoint])
        config.update(copy.deepcopy(TRAIN_COMMON if entrypoint == "train" else GOSSIP_COMMON))
        if entrypoint == "train":
            config["data_dir"] = data_dir
        config.update(copy.deepcopy(keys))
        module.config = config
        module.output_dir = os.path.join(folder, name)
        _reseed()
        if rank == 0:
            print(f"=== {layout}/{name}", flush=True)
        module.main()
    for entrypoint, module in modules.items():  # the defaults back: an importer may go on using the modules
        module.config = copy.deepcopy(defaults[entrypoint])
        module.output_dir = None
    return folder


def main(argv: list[str]) -> int:
    if argv[:1] == ["--save"] and len(argv) == 3:
        for path in save(argv[1], argv[2]):
            print(path)
        return 0
    if argv[:1] == ["--compare"] and len(argv) in (3, 4):
        differences = compare(argv[1], argv[2], relative_tolerance=float(argv[3]) if len(argv) == 4 else None)
        print("\n".join(differences) if differences else "identical")
        return 1 if differences else 0
    if argv == ["--arithmetic"]:
        print(json.dumps(this_machine()))
        return 0
    if len(argv) >= 1 and not argv[0].startswith("-"):
        run_cases(argv[0], argv[1].split(",") if len(argv) > 1 else None)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
