"""Golden comparison: a fixed list of tiny train.py and gossip_run.py runs (tests/golden_runs.py:
every registered method on a ring, D-PSGD, PowerGossip and push-sum also on graphs over time)
must write exactly, bit for bit, the metrics recorded in tests/golden/<layout>/<case>.jsonl,
in both launch layouts: all workers in one process, and `mpirun -np 2`. Wall-clock records
(split "runtime") are left out of the comparison (golden_runs.comparable_lines). The two
layouts' files are the same, and so are the two layouts' runs on any machine (the README's
layout contract: one thread per process, the same bits).

Bit for bit holds between machines that compute alike: the same float operations give other
last bits on another CPU (AVX2 or AVX-512, the kernels BLAS and oneDNN pick for it) or torch
release. tests/golden/ARITHMETIC.json keeps the recording machine's fingerprint
(golden_runs.arithmetic_fingerprint); where this machine's differs, the records are compared
within a relative 1e-5 of each value plus 1e-8 of where its series started (golden_runs._close;
the round-off between the machines seen so far stays below 1e-6 of each value), with a warning
that says so.

The golden files were recorded first from commit 34e016f (before the code moved into the
powergossip package), and again when the layouts came to sum in the same order (issue 27) and
the train.py cases gained the worst worker's test accuracy (split test_worst), with

    python tests/golden_runs.py OUT
    mpirun -np 2 python tests/golden_runs.py OUT
    python tests/golden_runs.py --save OUT tests/golden

Regenerate them the same way (from the repository root, OMP_NUM_THREADS=1 is set by the
script), and only for a change that is meant to change the numbers; say why in its commit.
`python tests/golden_runs.py --compare tests/golden OUT` lists the differences of a run by hand.
"""
import json
import os
import subprocess
import sys
import warnings
from unittest import mock

import pytest

from tests import golden_runs
from tests.launch import ROOT, run_mpi

GOLDEN = os.path.join(ROOT, "tests", "golden")
LAYOUTS = {"one-process": 1, "mpirun-2": 2}  # layout name -> processes
TIMEOUT_S = 300  # per layout; about 10-16 s each on an idle 2-core machine
_LAUNCHER_VARIABLES = ("OMPI_", "PMI_", "PMIX_")


@pytest.fixture(scope="module")
def golden_out(tmp_path_factory):
    """Every case in every layout, run once for the module: a folder with <layout>/<case>/metrics.jsonl."""
    out = tmp_path_factory.mktemp("golden")
    arguments = ["tests/golden_runs.py", str(out)]
    settings = {"GOLDEN_EXPECT_ROOT": ROOT, "OMP_NUM_THREADS": "1"}  # this checkout's code, one thread
    for processes in LAYOUTS.values():
        if processes == 1:
            env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARIABLES)} | settings
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
            result = subprocess.run([sys.executable] + arguments, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
            assert result.returncode == 0, \
                f"python {' '.join(arguments)} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        else:
            with mock.patch.dict(os.environ, settings):  # run_mpi hands os.environ on to the processes
                run_mpi(processes, arguments, timeout=TIMEOUT_S)
    return str(out)


def same_arithmetic(out: str, layout: str) -> bool:
    """Whether this machine computes as the one that recorded the golden files (golden_runs.arithmetic_fingerprint)."""
    recorded = golden_runs.recorded_arithmetic(GOLDEN)
    here = golden_runs.recorded_arithmetic(os.path.join(out, layout))
    assert recorded and here, f"no arithmetic fingerprint in {GOLDEN} or {out}/{layout} (golden_runs.ARITHMETIC_FILE)"
    if recorded["fingerprint"] != here["fingerprint"]:
        warnings.warn(f"the golden files were recorded on {recorded['cpu']} ({recorded['torch_cpu_capability']}, torch "
                      f"{recorded['torch']}), whose float arithmetic differs from this machine's ({here['cpu']}, "
                      f"{here['torch_cpu_capability']}, torch {here['torch']}): they are compared within a relative "
                      f"{golden_runs.RELATIVE_TOLERANCE:g} here (golden_runs._close), bit for bit only on such a machine")
    return recorded["fingerprint"] == here["fingerprint"]


def test_every_case_has_a_golden_file():
    for layout in LAYOUTS:
        recorded = sorted(name[:-len(".jsonl")] for name in os.listdir(os.path.join(GOLDEN, layout)) if name.endswith(".jsonl"))
        assert recorded == sorted(golden_runs.CASE_NAMES), \
            f"tests/golden/{layout} and golden_runs.CASES disagree: only golden {sorted(set(recorded) - set(golden_runs.CASE_NAMES))}, " \
            f"only in CASES {sorted(set(golden_runs.CASE_NAMES) - set(recorded))}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", golden_runs.CASE_NAMES)
def test_metrics_equal_the_golden_files(golden_out, layout, case):
    """Bit for bit on a machine with the recording machine's arithmetic; elsewhere every record
    the same but for values within float32 round-off (golden_runs._close)."""
    tolerance = None if same_arithmetic(golden_out, layout) else golden_runs.RELATIVE_TOLERANCE
    differences = golden_runs.compare(GOLDEN, golden_out, layouts=[layout], cases=[case], relative_tolerance=tolerance)
    assert not differences, (
        f"{layout}/{case} no longer writes the recorded metrics (tests/golden/{layout}/{case}.jsonl, see this module's "
        f"docstring); the run is in {golden_out}/{layout}/{case}:\n" + "\n".join(differences))


def test_both_layouts_hold_the_same_records():
    """What one process writes is what two processes write, bit for bit, for every case: in the
    golden files and in this machine's runs, whatever its arithmetic."""
    for case in golden_runs.CASE_NAMES:
        one, two = (golden_runs.comparable_lines(os.path.join(GOLDEN, layout, f"{case}.jsonl")) for layout in LAYOUTS)
        assert one == two, f"tests/golden/*/{case}.jsonl: the layouts' records part"


def test_this_machines_layouts_write_the_same_records(golden_out):
    layouts = list(LAYOUTS)
    for case in golden_runs.CASE_NAMES:
        one, two = (golden_runs.comparable_lines(os.path.join(golden_out, layout, case, "metrics.jsonl")) for layout in layouts)
        first = next((k for k, (a, b) in enumerate(zip(one, two)) if a != b), None)
        assert one == two, f"{case}: {layouts[0]} and {layouts[1]} part at comparable line {first}:\n  {one[first] if first is not None else ''}" \
                           f"\n  {two[first] if first is not None else ''}"


@pytest.mark.parametrize("case,name", [("train-dpsgd-ring", "loss"), ("gossip-power-gossip-ring", "error")])
def test_the_comparison_within_round_off_still_finds_a_change(tmp_path, case, name):
    """On another machine's arithmetic the golden files are compared within round-off: float32
    round-off passes; a change of a value (also late in a curve that decays from 20 to 1e-4),
    a count or a line does not."""
    lines = golden_runs.comparable_lines(os.path.join(GOLDEN, "one-process", f"{case}.jsonl"))

    def differences(edit):
        records = [json.loads(line) for line in lines]
        edit(records)
        os.makedirs(tmp_path / "one-process", exist_ok=True)
        with open(tmp_path / "one-process" / f"{case}.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        return golden_runs.compare(GOLDEN, str(tmp_path), layouts=["one-process"], cases=[case],
                                   relative_tolerance=golden_runs.RELATIVE_TOLERANCE)

    last = max(k for k, line in enumerate(lines) if json.loads(line)["name"] == name)

    def scale(k, factor):
        return lambda records: records[k].update(value=records[k]["value"] * factor)
    assert differences(lambda records: None) == []
    assert differences(scale(last, 1 + 1e-7)) == []  # round-off
    assert differences(scale(last, 1 + 1e-3)) != []  # a change
    assert differences(lambda records: records[last].update(bits=records[last]["bits"] + 8)) != []
    assert differences(lambda records: records.pop()) != []
