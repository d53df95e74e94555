"""Paths and inputs that cannot work (issue 26, defects 2, 3, 8, 9, and the gzip bomb and the large
.npy start of 10).

Each is refused before any work, with one line that names the key or file and the fix
(exit status 2 on the command line), and no output folder is claimed for it; a path that
resolves to a finished run is that run's folder. Inputs that once cost gigabytes are
tried in a subprocess under a 1 GB address-space limit, so a regression fails the test
instead of the machine.
"""
import gzip
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gossip_run
import train
from powergossip import configuration, runs, topologies
from tests.launch import ROOT
from tests.test_data import fake_fmnist, idx_bytes
from tests.test_gossip_run import named, run_main
from tests.test_runs import contents
from tests.train_runs import run

GIGABYTE = 1 << 30
TINY_GOSSIP = {"n_workers": 4, "matrix_size": 5, "num_steps": 3}


def value_errors_under_a_memory_limit(call: str, calls: list[tuple]) -> list[str]:
    """The message of the ValueError that `call(*arguments)` raises, for each arguments of
    `calls`, in a subprocess of this checkout whose address space is limited to 1 GB (what
    numpy or gzip could not allocate there raises MemoryError, as on a machine that ran out)."""
    code = f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, ({GIGABYTE}, {GIGABYTE}))
        from powergossip import topologies
        from powergossip.data import fashion_mnist
        messages = []
        for arguments in {calls!r}:
            try:
                {call}(*arguments)
            except ValueError as problem:
                messages.append(str(problem))
        print(json.dumps(messages))
        """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = json.loads(result.stdout)
    assert len(messages) == len(calls), messages
    return messages


# --- defect 2: a path through a missing folder and '..' --------------------------------------------
def test_an_output_dir_through_a_missing_folder_and_dotdot_is_checked_where_it_leads(tmp_path, monkeypatch):
    run_main(tmp_path / "runA", **TINY_GOSSIP)
    before = contents(tmp_path / "runA")
    with pytest.raises(configuration.ConfigError, match="holds another run's results"):
        run_main(f"{tmp_path}/nope/../runA", seed=7, **TINY_GOSSIP)
    assert contents(tmp_path / "runA") == before and not (tmp_path / "nope").exists()

    (tmp_path / "a_file").write_text("")
    with pytest.raises(configuration.ConfigError, match=f"{tmp_path / 'a_file'} is not a folder"):
        run_main(f"{tmp_path}/a_file/../runB", **TINY_GOSSIP)
    assert not (tmp_path / "runB").exists()

    monkeypatch.setattr(gossip_run, "config", dict(gossip_run.DEFAULTS, **TINY_GOSSIP))
    monkeypatch.setattr(gossip_run, "output_dir", f"{tmp_path}/missing/../fresh")
    assert gossip_run.main() == str(tmp_path / "fresh")  # a fresh folder: where the path leads, checked and written there
    assert sorted(os.listdir(tmp_path)) == ["a_file", "fresh", "runA"] and (tmp_path / "fresh" / "metrics.jsonl").exists()


# --- defect 3: edge-list files checked while they are read ------------------------------------------
def test_an_edge_list_too_big_for_n_workers_is_refused_while_it_is_read(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{i} {i + 1}\n" for i in range(20000)))  # 20,001 nodes, 218 KB
    big, zero = value_errors_under_a_memory_limit("topologies.build", [(f"file:{path}", 4), ("file:/dev/zero", 4)])
    assert "has 20001 workers but n_workers = 4" in big
    assert "/dev/zero, line 1 is longer than" in zero and len(zero) < 300


def test_a_garbage_topology_file_is_cut_in_the_message_and_a_binary_one_named(tmp_path):
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("0 1\n" + "x" * 3000 + "\n")
    with pytest.raises(ValueError, match="line 2: expected two integer node ids") as info:
        topologies.build(f"file:{garbage}", 4)
    assert len(str(info.value)) < 300 and "3000 characters" in str(info.value)
    binary = tmp_path / "graph.bin"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ValueError, match=f"{binary} is not a text file"):
        topologies.build(f"file:{binary}", 4)
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("ring\nfile:graph.bin\n")
    with pytest.raises(ValueError, match=f"schedule {schedule}, line 2 .*{binary} is not a text file"):
        topologies.build(f"schedule:{schedule}", 4)


# --- defect 8: gossip_run's input data ---------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    (np.where(np.arange(4 * 9).reshape(4, 3, 3) == 7, np.nan, 1.0), "entry 0 .*not finite"),
    (np.where(np.arange(4 * 9).reshape(4, 3, 3) == 20, np.inf, 1.0), "entry 2 .*not finite"),
    (np.where(np.arange(4 * 9).reshape(4, 3, 3) == 30, 1e300, 1.0), "entry 3 .*not finite.*beyond"),
    (np.ones((4, 3)) + 1j, "complex128 values; expected real numbers"),
    (np.ones((4, 0)), r"shape \(4, 0\): each worker's entry is empty"),
], ids=["nan", "inf", "overflows_float32", "complex", "empty_entries"])
def test_input_data_that_cannot_work_is_an_input_error(tmp_path, values, message):
    np.save(tmp_path / "start.npy", values)
    with pytest.raises(configuration.ConfigError, match=message):
        run_main(tmp_path / "out", data_type="file", data_path=str(tmp_path / "start.npy"), **TINY_GOSSIP)
    assert not (tmp_path / "out").exists()


def test_workers_that_agree_already_end_at_once(tmp_path, capsys):
    np.save(tmp_path / "start.npy", np.full((4, 3, 3), 2.5))
    records = run_main(tmp_path / "out", data_type="file", data_path=str(tmp_path / "start.npy"), algorithm="choco",
                       optimizer_diffusion_rate=[0.5, 1.0], **TINY_GOSSIP)
    assert [(r["step"], r["value"]) for r in named(records, "error")] == [(0, 0.0), (0, 0.0)]
    assert [(r["step"], r["value"]) for r in named(records, "final_error")] == [(0, 0.0), (0, 0.0)]
    assert "agree at step 0 already" in capsys.readouterr().out
    assert (tmp_path / "out" / "error_vs_bits.png").exists()


# --- defect 9: one line, exit status 2, no folder claimed ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    fake_fmnist(folder, n_train=64, n_test=16)
    return str(folder)


def small_run(tiny_data, **extra) -> list[str]:
    values = {"data_dir": tiny_data, "batch_size": 8, "num_epochs": 1, "n_workers": 4, "max_batches_per_epoch": 1,
              "device": "cpu", "evaluate_each_worker": False} | extra
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def damaged_copy(folder, name, content) -> str:
    """A copy of the tiny data set in `folder` with its file `name` replaced by `content`."""
    fake_fmnist(folder, n_train=64, n_test=16, gz_train=False, gz_test=False)
    (folder / name).write_bytes(content)
    return str(folder)


def exits_with_one_line(monkeypatch, capsys, program, arguments) -> str:
    """Runs `program`'s command line in this process; it must end with exit status 2 and one line."""
    monkeypatch.setattr(program, "config", program.config)  # command_line replaces them: put them back afterwards
    monkeypatch.setattr(program, "output_dir", program.output_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        program.command_line(arguments)
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_status.value.code == 2 and len(errors) == 1, errors
    return errors[0]


CASES = {  # name: (arguments after the tiny run's, what the line must say)
    "yaml_argument": (["seed=[1"], "seed: the value '\\[1' is not valid YAML .*column 3"),
    "yaml_file": (["{tmp}/bad.yaml"], "bad.yaml is not valid YAML: .*flow sequence.*line 3, column 1"),
    "seed": (["seed=-1"], "seed must be an integer in 0..4294967295, got -1"),
    "batch_larger_than_a_shard": (["batch_size=17"], "batch_size=17 is larger than each worker's shard of 16 .*batch_size <= 16"),
    "truncated_file": (["data_dir={truncated}"], "train-images-idx3-ubyte: truncated IDX data"),
    "wrong_magic": (["data_dir={magic}"], "train-labels-idx1-ubyte: bad IDX magic number 2051, expected 2049"),
    "label_out_of_range": (["data_dir={labels}"], "t10k-labels-idx1-ubyte: label 10 outside 0..9. Install"),
    "empty_data_dir": (["data_dir={tmp}/empty"], "Fashion-MNIST not found: .*/empty lacks train-images"),
    "device_without_a_gpu": (["device=cuda"], "device='cuda' but torch sees no GPU; use device=cpu"),
}


@pytest.mark.parametrize("case", CASES)
def test_errors_that_promise_one_line_give_one_line_before_the_folder_is_claimed(tmp_path, tiny_data, monkeypatch,
                                                                                capsys, case):
    if case == "device_without_a_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\nseed: [1\n")
    (tmp_path / "empty").mkdir()
    folders = {"tmp": tmp_path,
               "truncated": damaged_copy(tmp_path / "truncated", "train-images-idx3-ubyte",
                                         idx_bytes(np.zeros((64, 28, 28)))[:-10]),
               "magic": damaged_copy(tmp_path / "magic", "train-labels-idx1-ubyte",
                                     idx_bytes(np.zeros(64), magic=2051)),
               "labels": damaged_copy(tmp_path / "labels", "t10k-labels-idx1-ubyte",
                                      idx_bytes(np.full(16, 10)))}
    extra, message = CASES[case]
    arguments = small_run(tiny_data) + [a.format(**folders) for a in extra] + [f"output_dir={tmp_path}/out"]
    line = exits_with_one_line(monkeypatch, capsys, train, arguments)
    assert line.startswith("train.py: configuration error (process 0): ")
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_gossip_run_refuses_a_negative_seed_in_one_line(tmp_path, monkeypatch, capsys):
    line = exits_with_one_line(monkeypatch, capsys, gossip_run, ["seed=-1", f"output_dir={tmp_path}/out"])
    assert "seed must be an integer in 0..4294967295, got -1" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stored, message", [
    ("- a list\n", "config.yaml holds a list, where a run writes a mapping"),
    ("", "config.yaml is empty"),
    ("seed: [1\n", "config.yaml is not valid YAML"),
], ids=["list", "empty", "yaml_syntax"])
def test_a_stored_config_that_is_not_a_mapping_stops_resume_in_one_line(tmp_path_factory, tiny_data, monkeypatch,
                                                                        capsys, stored, message):
    folder = tmp_path_factory.mktemp("finished")
    run(str(folder), small_run(tiny_data))
    (folder / "config.yaml").write_text(stored)
    before = contents(folder)
    line = exits_with_one_line(monkeypatch, capsys, train,
                               small_run(tiny_data, num_epochs=2) + ["resume=true", f"output_dir={folder}"])
    assert message in line and "put back the config.yaml the run wrote" in line
    assert contents(folder) == before


def test_a_bad_metrics_line_stops_resume_in_one_line(tmp_path_factory, tiny_data, monkeypatch, capsys):
    folder = tmp_path_factory.mktemp("finished")
    run(str(folder), small_run(tiny_data))
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("garbage{\n")
    before = contents(folder)
    line = exits_with_one_line(monkeypatch, capsys, train,
                               small_run(tiny_data, num_epochs=2) + ["resume=true", f"output_dir={folder}"])
    assert "is not a JSON record" in line and "repair or remove that line" in line
    assert contents(folder) == before


# --- defect 10 (part): a gzip bomb in data_dir ----------------------------------------------------------
def test_a_gzip_bomb_is_refused_from_its_header_under_a_memory_limit(tmp_path):
    member = gzip.compress(bytes(16 << 20), compresslevel=1)  # 16 MB of zeros in ~16 KB
    (tmp_path / "zeros.gz").write_bytes(member * 96)  # 1.5 GB once decompressed: more than the limit
    claims = idx_bytes(np.zeros((1, 28, 28)))[:16]  # a header that says a billion images, then nothing
    (tmp_path / "claims.gz").write_bytes(gzip.compress(claims[:4] + (10 ** 9).to_bytes(4, "big") + claims[8:]))
    zeros, claims = value_errors_under_a_memory_limit(
        "fashion_mnist.read_idx", [(str(tmp_path / name), 2051) for name in ("zeros.gz", "claims.gz")])
    assert "zeros.gz: bad IDX magic number 0, expected 2051" in zeros
    assert "claims.gz: truncated IDX data: header says (1000000000, 28, 28)" in claims and "holds at most" in claims


# --- defect 10 (last part): gossip_run's data_path array, read in blocks, its memory estimated first ----
def test_a_data_path_array_runs_in_a_few_times_its_size_and_one_that_cannot_fit_is_refused(tmp_path):
    """A 64 MB float32 start (4 workers of 2048 x 2048) under an address-space limit of 5x its
    size above what the process maps once warmed up: the run (PowerGossip) finishes, where
    the old peak (about 9x: the array loaded, a float64 copy for the mean, float64 copies to
    measure) ran out. At 2x, below the run's estimate, it is refused before any work, in one
    line naming the file, the estimate and the limit, and claims no folder."""
    start = tmp_path / "start.npy"
    np.save(start, np.random.default_rng(0).standard_normal((4, 2048, 2048), dtype=np.float32))
    code = f"""
        import json, os, resource, sys
        import torch
        torch.set_num_threads(1)
        import gossip_run
        from powergossip import figures  # drawn at the end of a run: imported before the limit
        arguments = ["n_workers=4", "algorithm=power_gossip", "num_steps=3"]
        gossip_run.command_line(arguments + ["matrix_size=5", "output_dir={tmp_path}/warm"])  # imports, allocator
        codes = []
        for budget in (2, 5):
            mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + budget * {start.stat().st_size}, resource.RLIM_INFINITY))
            try:
                gossip_run.command_line(arguments + ["data_type=file", "data_path={start}", f"output_dir={tmp_path}/x{{budget}}"])
                codes.append(0)
            except SystemExit as stop:
                codes.append(stop.code)
        print(json.dumps(codes))
        """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")  # large buffers mapped and unmapped: the address space follows them
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [2, 0]
    refusal = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(refusal) == 1 and re.search(rf"data_path '{start}': the run needs about 0\.\d+ GB .* but 0\.1\d* GB are "
                                           r"available \(the address-space limit \(ulimit -v\)", refusal[0]), refusal
    assert not (tmp_path / "x2").exists()
    errors = [r["value"] for r in runs.read_metrics(str(tmp_path / "x5")) if r["name"] == "error"]
    assert len(errors) == 4 and errors[-1] < errors[0]
