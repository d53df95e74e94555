"""Start runs as forks of one interpreter that has imported torch and the library already.

A run of train.py or gossip_run.py at the studies' small scales spends most of its time
starting Python and importing torch; experiments/sweep.py therefore starts one of these
servers per launch and asks it for each single-process run. It reads requests, one JSON
object a line, on stdin:

    {"path": ENTRYPOINT, "argv": [...], "log": LOG}   fork a run of `python ENTRYPOINT argv...`
                                                        with stdout and stderr to LOG
    {"kill": PID}                                      SIGKILL a run that has not been reaped yet

and answers on stdout `started PID`, or `unsafe` where forking could deadlock (a thread
besides this one exists, or /proc cannot tell), and reports every run's end as
`exited PID STATUS` (Popen's returncode: negative for a signal). At the end of stdin it
kills the runs still going and exits. A forked run goes on as a fresh interpreter would:
runpy runs the entrypoint as __main__, and an exception, sys.exit or the end of the script
ends the process through the interpreter's own exit (traceback, status, atexit, flushing).
"""
import gc
import json
import os
import runpy
import select
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # where the entrypoints find `powergossip`, as `python train.py` does
import numpy  # noqa: E402
import torch  # noqa: E402, F401  (imported, never used here: no threads, no device)
from powergossip import (algorithms, comm, compressors, configuration, data, figures, metrics, models,  # noqa: E402, F401
                         optimizer, runs, topologies)
from powergossip.models import stacked  # noqa: E402, F401

try:
    from torch.utils import tensorboard  # noqa: F401  (both entrypoints' records go there where it is installed: seconds to import)
except ImportError:
    pass


def single_threaded() -> bool:
    return os.path.isdir("/proc/self/task") and len(os.listdir("/proc/self/task")) == 1


def serve() -> dict:
    """Answer requests until stdin ends; return a run's request in its forked child only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runs (one process group); the launcher ends this
    # numpy's OpenBLAS starts a pool of threads at import and stops it before every fork
    # (pthread_atfork): one fork that exits at once leaves this process with its own thread only.
    if os.fork() == 0:
        os._exit(0)
    os.wait()
    # The imports out of the collector's reach: a forked run's exit otherwise touches every one of
    # them, copying the pages it shares with this process (a forked run's exit took 1.1 s, 0.4 s frozen).
    gc.freeze()
    requests = open(0, "rb", buffering=0, closefd=False)  # unbuffered: select sees every line
    children = set()

    def answer(text: str):
        os.write(1, (text + "\n").encode())

    while True:
        if select.select([requests], [], [], 0.05)[0]:
            line = requests.readline()
            if not line:
                break
            request = json.loads(line)
            if "kill" in request:
                if request["kill"] in children:  # not reaped: still this server's child, not a reused pid
                    os.kill(request["kill"], signal.SIGKILL)
            elif not single_threaded():
                answer("unsafe")
            else:
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    null = os.open(os.devnull, os.O_RDONLY)
                    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                    for fd, target in ((0, null), (1, log), (2, log)):
                        os.dup2(target, fd)
                    os.close(null)
                    os.close(log)
                    return request
                children.add(pid)
                answer(f"started {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.remove(pid)
            answer(f"exited {pid} {os.waitstatus_to_exitcode(status)}")
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    sys.exit(0)


def trimmed_excepthook(path: str):
    """Print an uncaught exception as `python path` would: from the script's first frame on,
    without this file's and runpy's (none at all for a script that does not compile)."""
    def hook(kind, value, traceback):
        while traceback is not None and traceback.tb_frame.f_code.co_filename != path:
            traceback = traceback.tb_next
        sys.__excepthook__(kind, value.with_traceback(traceback), traceback)
    return hook


if __name__ == "__main__":
    request = serve()
    path = request["path"]
    sys.argv = [path] + request["argv"]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    sys.excepthook = trimmed_excepthook(path)
    numpy.random.seed()  # fresh entropy for numpy's global generator, as a fresh interpreter has
    runpy.run_path(path, run_name="__main__")
