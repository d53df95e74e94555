"""PowerGossip under one import name, without generic names on anyone's import path.

The code lives at the repository root (train.py, gossip_run.py, algorithms.py,
compressors.py, comm.py, topologies.py, configuration.py, runs.py, models/, data/), where
`python train.py` and `import train` work as in the original project. This package
adds that root to its own search path, so the same files are also
`powergossip.algorithms`, `powergossip.train`, `powergossip.models`, ... from any
folder once the project is installed (`pip install -e .`, the README's set-up):
installing puts only the name `powergossip` on the import path, so a user's own
`data/` or `models/` package stays theirs. Inside the project every module imports
its siblings through this package, so each is loaded once.
"""
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if not os.path.isfile(os.path.join(_ROOT, "algorithms.py")):
    raise ImportError(f"powergossip is used from its repository (no algorithms.py in {_ROOT}): "
                      f"install it with `pip install -e <the repository>`")
__path__.append(_ROOT)

_API = {  # the public names, each loaded on first use: `import powergossip` stays cheap
    "register_algorithm": "powergossip.algorithms",
    "register_compressor": "powergossip.compressors",
    "DecentralizedOptimizer": "powergossip.optimizer",
    "PowerSGD": "powergossip.optimizer",  # PowerSGD, Config, optimizer_step: the reference's interface
    "Config": "powergossip.optimizer",
    "optimizer_step": "powergossip.optimizer",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'powergossip' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
