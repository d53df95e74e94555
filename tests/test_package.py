"""The package as users get it: the repository root's names (`train`, `models`, ...) are the
package's modules themselves, and an installation (a wheel, or `pip install -e .`) puts the
name `powergossip` on the import path and nothing else.

Everything runs in subprocesses (a fresh interpreter is what a user has), each bounded in
time, with PYTHONPATH removed from their environment so that nothing here is found by accident.
The wheel and the virtual environment it goes into are built once for the module, offline
(`--no-index`, `--no-build-isolation`), from a copy of the working tree: the checkout gets no
`build/` folder, and files not committed yet are in the wheel as they would be after a commit.
"""
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 120  # seconds, for any one subprocess (each takes a few seconds on an idle 2-core machine)
ROOT_NAMES = ("train", "gossip_run", "algorithms", "compressors", "topologies", "models", "data")
ROOT_PACKAGES = ("models", "data")
# Never top-level names of an installation: the root's names and the files that moved into the package.
NOT_INSTALLED = ROOT_NAMES + ("comm", "configuration", "figures", "kernels", "metrics", "optimizer", "runs", "tests")


def environment(**extra) -> dict[str, str]:
    """This process's environment less what would put other code on the import path or make pip
    go online."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "PYTHONUSERBASE")
           and not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def run(command: list[str], cwd: str, expect: int | None = 0, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command to its end (at most `timeout` seconds); with `expect`, fail the test on any
    other exit status, showing everything the command printed."""
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    if expect is not None and result.returncode != expect:
        raise AssertionError(f"{' '.join(command)} (in {cwd}) exited {result.returncode}, expected {expect}\n"
                             f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def run_together(commands: list[list[str]], cwd: str, expect: int = 0) -> list[subprocess.CompletedProcess]:
    """`run` for several commands at once (they start side by side: each one's time is mostly
    its interpreter importing torch)."""
    processes = [subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    results = []
    try:
        for command, process in zip(commands, processes):
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for result in results:
        if result.returncode != expect:
            raise AssertionError(f"{' '.join(result.args)} (in {cwd}) exited {result.returncode}, expected {expect}\n"
                                 f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return results


def python_json(python: str, code: str, cwd: str, *arguments: str):
    """`python -c CODE ARGUMENTS` in `cwd` (sys.path[0] is then `cwd`, as for a user there); CODE
    prints one JSON value on its last line."""
    result = run([python, "-c", textwrap.dedent(code), *arguments], cwd)
    return json.loads(result.stdout.strip().splitlines()[-1])


def under(path: str | None, folder: str) -> bool:
    return path is not None and os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def read_records(folder) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    assert os.path.isfile(path), f"no metrics.jsonl in {folder}: {sorted(os.listdir(folder))}"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_tiny_fashion_mnist(folder, n_train=32, n_test=8):
    """The four Fashion-MNIST IDX files (raw, not gzipped), random pixels and labels."""
    rng = random.Random(0)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        with open(os.path.join(folder, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">iiii", 2051, n, 28, 28) + rng.randbytes(n * 28 * 28))
        with open(os.path.join(folder, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">ii", 2049, n) + bytes(rng.randrange(10) for _ in range(n)))
    return str(folder)


# The checks a fresh interpreter makes of what it imported (run with `python -c`).
MODULE_FILES = """
    def module_files(root):
        '''{realpath of a file under root: [names in sys.modules of the module objects loaded from it]}'''
        files = {}
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if path and os.path.realpath(path).startswith(root + os.sep):
                files.setdefault(os.path.realpath(path), {}).setdefault(id(module), []).append(name)
        return {path: sorted(map(sorted, objects.values())) for path, objects in files.items()}
"""

IDENTITY_CHECK = MODULE_FILES + """
    import importlib, json, os, pkgutil, sys, tempfile
    root, order = os.path.realpath(os.getcwd()), sys.argv[1]
    assert os.path.realpath(sys.path[0] or os.getcwd()) == root, sys.path[:3]

    def load(name):
        exec(f"import {name}", {})  # the import statement, as a user writes it
        return sys.modules[name]  # (not `import models.lstm as m`: the package's function lstm hides that module)

    names = list(ROOT_NAMES)
    for package in ROOT_PACKAGES:  # every submodule, by its file: models.resnet, data.partition, ...
        folder = os.path.join(root, "powergossip", package)
        names += [f"{package}.{info.name}" for info in pkgutil.iter_modules([folder])]
    pairs = {}
    for name in names:
        if order == "root-first":
            short, full = load(name), importlib.import_module(f"powergossip.{name}")
        else:
            full, short = importlib.import_module(f"powergossip.{name}"), load(name)
        pairs[name] = {"same": short is full, "short": getattr(short, "__name__", None),
                       "file": os.path.relpath(os.path.realpath(short.__file__), root)}
    pairs["models.resnet via attribute"] = {"same": sys.modules["models"].resnet is sys.modules["powergossip.models.resnet"]}

    # A tiny thing through the root names, with the hooks set there (the package's main() must see them).
    import data, gossip_run, models, torch
    seen = []
    with tempfile.TemporaryDirectory() as folder:
        gossip_run.config = dict(gossip_run.DEFAULTS, n_workers=2, matrix_size=4, num_steps=3)
        gossip_run.output_dir = os.path.join(folder, "run")
        gossip_run.log_metric = lambda name, values, tags: seen.append(name)
        gossip_run.main()
    torch.manual_seed(0)
    models.build("small_cnn", in_channels=1)(torch.zeros(2, 1, 28, 28))
    data.make_partition("iid", torch.arange(8) % 2, n_workers=2)

    print(json.dumps({"pairs": pairs, "files": module_files(root), "records": len(seen),
                      "train file": sys.modules["train"].__file__}))
""".replace("ROOT_NAMES", repr(ROOT_NAMES)).replace("ROOT_PACKAGES", repr(ROOT_PACKAGES))


# ---------------------------------------------------------------- the checkout: one module per file
@pytest.mark.parametrize("order", ["root-first", "package-first"])
def test_root_names_are_the_package_modules_themselves(order):
    report = python_json(sys.executable, IDENTITY_CHECK, ROOT, order)
    pairs = report["pairs"]
    assert {"models.resnet", "models.stacked", "data.partition"} <= set(pairs)
    different = {name: pair for name, pair in pairs.items() if not pair["same"]}
    assert not different, f"`import X` is not `powergossip.X` ({order}): {different}"
    for name, pair in pairs.items():
        if "file" in pair:
            assert pair["short"] == f"powergossip.{name}"
            assert pair["file"].startswith("powergossip" + os.sep), pair
    duplicates = {path: objects for path, objects in report["files"].items() if len(objects) > 1}
    assert not duplicates, f"files loaded as more than one module object: {duplicates}"
    shims = [os.path.join(ROOT, f"{name}.py") for name in ROOT_NAMES if name not in ROOT_PACKAGES]
    shims += [os.path.join(ROOT, name, "__init__.py") for name in ROOT_PACKAGES]
    assert not set(report["files"]) & set(map(os.path.realpath, shims)), "a root file stayed a module of its own"
    assert report["records"] > 0 and under(report["train file"], os.path.join(ROOT, "powergossip"))


def check_bad_argument_reports(commands: list[list[str]], programs: list[str], cwd: str):
    """Each command, given an unknown key, ends with its program's configuration error and exit status 2."""
    for result, program in zip(run_together([command + ["badkey=1"] for command in commands], cwd, expect=2), programs):
        assert f"{program}: configuration error" in result.stderr and "'badkey'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_root_scripts_report_a_bad_argument():
    """`python train.py` / `python gossip_run.py` in the checkout: the root files' `__main__` branch."""
    scripts = ["train.py", "gossip_run.py"]
    check_bad_argument_reports([[sys.executable, script] for script in scripts], scripts, ROOT)


# ---------------------------------------------------------------- the machine's own installation
@pytest.fixture(scope="module")
def editable_install(tmp_path_factory):
    """This checkout's folder when the machine's powergossip is an editable install of it, as after
    the README's `pip install -e .`; the tests that need one skip otherwise. Asked from another
    folder: in this process the checkout's own powergossip.egg-info (if any) is on sys.path."""
    report = python_json(sys.executable, """
        import importlib.metadata, json
        try:
            print(json.dumps(importlib.metadata.distribution("powergossip").read_text("direct_url.json") or "{}"))
        except importlib.metadata.PackageNotFoundError:
            print(json.dumps(None))
    """, str(tmp_path_factory.mktemp("probe")))
    if report is None:
        pytest.skip("powergossip is not installed (`pip install -e .` installs this checkout)")
    direct_url = json.loads(report)
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip(f"the installed powergossip is not an editable install (direct_url.json: {direct_url})")
    location = direct_url["url"].removeprefix("file://")
    if os.path.realpath(location) != ROOT:
        pytest.skip(f"the editable powergossip installed is {location}, not this checkout {ROOT}")
    return location


def test_module_command_lines_from_another_folder(editable_install, tmp_path):
    programs = ["train", "gossip_run"]
    check_bad_argument_reports([[sys.executable, "-m", f"powergossip.{program}"] for program in programs],
                               [f"{program}.py" for program in programs], str(tmp_path))


IMPORTS_FROM_ELSEWHERE = MODULE_FILES + """
    import importlib, json, os, sys
    found = {}
    for name in NOT_INSTALLED:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            assert error.name == name, error  # the name itself is missing, not something it imports
            found[name] = None
        else:
            found[name] = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), repr(module))
    import powergossip, powergossip.models, powergossip.data, powergossip.train, powergossip.gossip_run
    files = {name: os.path.realpath(sys.modules[name].__file__) for name in sys.modules if name.startswith("powergossip")}
    print(json.dumps({"found": found, "files": files, "cwd": os.getcwd(), "path0": sys.path[0],
                      "duplicates": {k: v for k, v in module_files(os.path.realpath(sys.argv[1])).items() if len(v) > 1}}))
""".replace("NOT_INSTALLED", repr(NOT_INSTALLED))


def leaks(found: dict, *folders: str) -> dict:
    """The names of `found` ({name: its file, or None when ModuleNotFoundError}) that were
    imported from one of `folders` (another package of that name elsewhere is none of ours)."""
    return {name: where for name, where in found.items()
            if where is not None and (any(under(where, folder) for folder in folders) or not os.path.isabs(where))}


def test_editable_install_puts_only_powergossip_on_the_path(editable_install, tmp_path):
    report = python_json(sys.executable, IMPORTS_FROM_ELSEWHERE, str(tmp_path), ROOT)
    assert report["path0"] == "" and not under(report["cwd"], ROOT)
    leaked = leaks(report["found"], ROOT)
    assert not leaked, f"names importable from another folder besides powergossip: {leaked}"
    outside = {name: path for name, path in report["files"].items() if not under(path, os.path.join(ROOT, "powergossip"))}
    assert not outside and "powergossip.models" in report["files"], outside
    assert not report["duplicates"]


# ---------------------------------------------------------------- a wheel in a fresh virtual environment
def working_tree_files() -> list[str]:
    """The checkout's files as a commit of its present state would hold them: tracked ones and
    untracked ones that are not ignored, less those deleted."""
    try:
        listing = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 capture_output=True, timeout=60, check=True).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        listing = ""
    files = [f for f in listing.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    if not files:  # not a git checkout (a source archive): everything but build products
        skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [d for d in subfolders if d not in skip and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if not n.endswith(".pyc")]
    return files


def prerequisites() -> str | None:
    """Why a wheel cannot be built and installed offline here, or None (asked without importing
    setuptools here: it patches distutils in the process that imports it)."""
    for module in ("venv", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not available"
    setuptools_version = importlib.metadata.version("setuptools")
    version = tuple(int(part) for part in setuptools_version.split(".")[:2] if part.isdigit())
    if version < (64,):
        return f"setuptools {setuptools_version} < 64 cannot build pyproject.toml's project without build isolation"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # older setuptools build wheels through it
        return f"setuptools {setuptools_version} needs the `wheel` package for `pip wheel --no-build-isolation`"
    probe = subprocess.run([sys.executable, "-m", "pip", "wheel", "--help"], capture_output=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        return "`python -m pip wheel` is not available"
    return None


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """{"wheel": path, "python": the venv's interpreter, "bin": its scripts folder, "site": its
    site-packages, "source": the copy of the working tree}: the wheel built once from a copy of
    the working tree and installed, without dependencies, into a fresh virtual environment that
    reuses this machine's packages (torch, ...)."""
    reason = prerequisites()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("package")
    source = base / "source"
    for name in working_tree_files():
        os.makedirs(os.path.dirname(source / name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "-q", "-w", str(base / "wheel"), str(source)], str(base))
    wheels = [name for name in os.listdir(base / "wheel") if name.endswith(".whl")]
    assert len(wheels) == 1, wheels
    wheel = str(base / "wheel" / wheels[0])

    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], str(base))
    python = str(venv / "bin" / "python")
    site = python_json(python, "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))", str(base))
    if sys.prefix != sys.base_prefix:  # this interpreter is a venv itself: give the new one its packages too, after its own
        import site as site_module
        with open(os.path.join(site, "outer-environment.pth"), "w") as f:
            f.write("\n".join(site_module.getsitepackages()) + "\n")
    if run([python, "-m", "pip", "--version"], str(base), expect=None).returncode != 0:
        run([python, "-m", "ensurepip", "--default-pip"], str(base))  # offline: pip's own bundled wheel
    # --ignore-installed: pip never even tries to remove the machine's own (editable) installation,
    # which lies outside this environment (it would refuse to, and say so).
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--ignore-installed", "-q", wheel],
        str(base))
    return {"wheel": wheel, "python": python, "bin": str(venv / "bin"), "site": site, "source": str(source),
            "base": str(base)}


def test_wheel_holds_only_the_package(installed_wheel):
    with zipfile.ZipFile(installed_wheel["wheel"]) as archive:
        names = archive.namelist()
        dist_info = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1 and next(iter(dist_info)).startswith("powergossip-"), dist_info
        entry_points = archive.read(f"{next(iter(dist_info))}/entry_points.txt").decode()
    others = [name for name in names if name.split("/")[0] not in {"powergossip"} | dist_info]
    assert not others, f"the wheel holds files outside powergossip/: {others}"
    package_files = {os.path.relpath(os.path.join(folder, name), installed_wheel["source"])
                     for folder, _, files in os.walk(os.path.join(installed_wheel["source"], "powergossip"))
                     for name in files if name.endswith(".py") and "__pycache__" not in folder}
    missing = sorted(package_files - set(names))
    assert not missing, f"files of powergossip/ not in the wheel (a package without __init__.py?): {missing}"
    assert {"powergossip/models/resnet.py", "powergossip/data/partition.py", "powergossip/train.py"} <= set(names)
    assert "powergossip-train = powergossip.train:command_line" in entry_points
    assert "powergossip-gossip-run = powergossip.gossip_run:command_line" in entry_points


def test_venv_imports_the_wheel_and_nothing_else(installed_wheel, tmp_path):
    report = python_json(installed_wheel["python"], IMPORTS_FROM_ELSEWHERE, str(tmp_path), installed_wheel["site"])
    leaked = leaks(report["found"], ROOT, installed_wheel["site"])
    assert not leaked, f"names importable in the virtual environment besides powergossip: {leaked}"
    outside = {name: path for name, path in report["files"].items()
               if not under(path, os.path.join(installed_wheel["site"], "powergossip"))}
    assert not outside, f"powergossip modules not from the venv's copy (the editable install won?): {outside}"
    assert not report["duplicates"]


def test_venv_console_scripts_report_a_bad_argument(installed_wheel, tmp_path):
    check_bad_argument_reports([[os.path.join(installed_wheel["bin"], "powergossip-train")],
                                [os.path.join(installed_wheel["bin"], "powergossip-gossip-run")]],
                               ["train.py", "gossip_run.py"], str(tmp_path))


def test_venv_trains(installed_wheel, tmp_path):
    data_dir = write_tiny_fashion_mnist(tmp_path / "fashion-mnist")
    output = tmp_path / "run"
    run([installed_wheel["python"], "-m", "powergossip.train", "task=fashion_mnist", "task_architecture=small_cnn",
         "n_workers=2", "num_epochs=1", "max_batches_per_epoch=2", "batch_size=8", "evaluation_batch_size=8",
         "optimizer=power-gossip", "device=cpu", "seed=1", f"data_dir={data_dir}", f"output_dir={output}"], str(tmp_path))
    records = read_records(output)
    assert {r["epoch"] for r in records} == {1.0}
    train_loss = {r["tags"].get("worker"): r for r in records if r["name"] == "loss" and r["tags"].get("split") == "train"}
    assert set(train_loss) == {0, 1, None}, train_loss
    for split in ("train", "test", "test_avg"):
        losses = [r["value"] for r in records if r["name"] == "loss" and r["tags"].get("split") == split]
        assert losses and all(math.isfinite(v) and v > 0 for v in losses), (split, losses)
    assert train_loss[None]["bits"] > 0 and train_loss[None]["messages"] > 0  # the workers gossiped
    assert (output / "config.yaml").is_file() and (output / "checkpoints" / "rank0.pt").is_file()


def test_venv_gossip_run_reaches_consensus(installed_wheel, tmp_path):
    output = tmp_path / "run"
    run([installed_wheel["python"], "-m", "powergossip.gossip_run", "algorithm=power_gossip", "n_workers=4",
         "matrix_size=10", "num_steps=30", f"output_dir={output}"], str(tmp_path))
    records = read_records(output)
    errors = [r for r in records if r["name"] == "error"]
    assert errors and errors[0]["step"] == 0 and errors[-1]["step"] == 30
    assert errors[-1]["value"] < 0.1 * errors[0]["value"], [(r["step"], r["value"]) for r in errors]
    assert errors[-1]["bits"] > 0
    assert [r["value"] for r in records if r["name"] == "final_error"] == [errors[-1]["value"]]
