"""Start mpirun from inside a test, bounded in time, and collect what the ranks wrote."""
import os
import subprocess
import sys

from powergossip import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mpi(num_processes: int, args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`mpirun -np N python ARGS...` from the repository root; fails the test on a non-zero exit
    (when `check`) with everything the processes printed."""
    command = launch.mpirun_command(num_processes) + [sys.executable] + args
    env = launch.mpirun_environment()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def installed_environment() -> dict[str, str] | None:
    """The environment in which `powergossip` imports from any folder, as after the README's
    set-up command (`pip install -e .`); None where this checkout is not the one installed
    (then a test of a user's view from another folder is skipped)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import os, powergossip; print(os.path.realpath(powergossip.__file__))"],
                           cwd="/", env=env, capture_output=True, text=True, timeout=60)
    this_checkout = os.path.realpath(os.path.join(ROOT, "powergossip", "__init__.py"))
    return env if probe.returncode == 0 and probe.stdout.strip() == this_checkout else None
