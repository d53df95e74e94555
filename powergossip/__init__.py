"""PowerGossip: decentralized deep learning with compressed gossip.

The implementation is this package; `pip install .` (or `-e .`) puts only the name
`powergossip` on the import path. In a checkout, the repository root also holds the
original project's files (`train.py`, `gossip_run.py`, `algorithms.py`, `compressors.py`,
`topologies.py`, `models/`, `data/`): each is this package's module under a second
name, the same object (`import train` is `powergossip.train`), never a copy.
"""
import importlib
import pkgutil
import sys

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
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'powergossip' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


def alias_root_module(name: str):
    """Make the repository root's `name` (`train`, `models`, ...) this package's module of that
    name, itself: a root file calls this instead of holding code, so there is one module object.
    For a package, its submodules get the second name too (`import models.resnet`)."""
    module = importlib.import_module(f"powergossip.{name}")
    sys.modules[name] = module
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        sys.modules[f"{name}.{info.name}"] = importlib.import_module(f"powergossip.{name}.{info.name}")
    return module
