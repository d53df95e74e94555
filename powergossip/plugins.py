"""Plug-ins: a user's own modules, named by a configuration's `plugins` key and imported
before the rest of it is checked, so that what they register (a method with
`register_algorithm`, a compressor with `register_compressor`) can be named in it:

    python train.py plugins=[my_gossip.py] optimizer=my-gossip
    python gossip_run.py plugins=[my_methods] algorithm=my-gossip

An entry that ends in `.py` or holds a path separator is a file (a relative path is read
from the folder the run starts in), imported as the module named by its file name; any
other entry is a module name, imported as `import` would (installed, or on PYTHONPATH).
Each process of a launch imports them itself, as it checks its own configuration. A
configuration that names plug-ins runs their code. The files they are read from define
the run: `files` names them for its fingerprint (runs.fingerprint), so that a resume
with a changed plug-in is refused.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

from powergossip.errors import ConfigError


def is_file(entry: str) -> bool:
    """Whether a `plugins` entry names a file (else a module)."""
    return entry.endswith(".py") or os.sep in entry or (os.altsep is not None and os.altsep in entry)


def load(entries) -> None:
    """Import every plug-in of `entries` (a `plugins` value), in order; one that is already
    imported from the same file is not run again. ConfigError naming the entry and what went
    wrong (in one line) for an entry that is not a name or whose import fails."""
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"plugins holds module names or paths to .py files, got {entry!r}")
        if is_file(entry):
            _import_file(entry)
        else:
            _import_module(entry)


def files(entries) -> dict[str, str]:
    """The file each plug-in of `entries` (already loaded) was read from, under the label
    `plugins <entry>`; a module without a file of its own (built into Python) has none."""
    found = {}
    for entry in entries:
        path = entry if is_file(entry) else getattr(sys.modules.get(entry), "__file__", None)
        if path is not None:
            found[f"plugins {entry}"] = path
    return found


def _import_file(entry: str) -> None:
    path = os.path.abspath(entry)
    if not os.path.isfile(path):
        raise ConfigError(f"plugins: {entry} is not a file (an entry is a module name or the path of a .py file)")
    name = os.path.splitext(os.path.basename(path))[0]
    imported = sys.modules.get(name)
    if imported is not None:
        source = getattr(imported, "__file__", None)
        if source is not None and os.path.exists(source) and os.path.samefile(source, path):
            return
        raise ConfigError(f"plugins: {entry} would be imported as module {name}, but a module of that name is imported "
                          f"already ({source or 'built in'}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: the module's own code may import itself (dataclasses, pickling)
    try:
        spec.loader.exec_module(module)
    except Exception as problem:
        del sys.modules[name]
        raise ConfigError(f"plugins: {entry} failed to import: {_one_line(problem)}") from None


def _import_module(entry: str) -> None:
    try:
        importlib.import_module(entry)
    except ModuleNotFoundError as problem:
        if problem.name is not None and (entry + ".").startswith(problem.name + "."):  # the entry itself, not its imports
            raise ConfigError(f"plugins: cannot import {entry}: no module named {problem.name!r}; give the path of its .py "
                              f"file (plugins=[path/to/{entry.split('.')[-1]}.py]) or put its folder on PYTHONPATH") from None
        raise ConfigError(f"plugins: module {entry} failed to import: {_one_line(problem)}") from None
    except Exception as problem:
        raise ConfigError(f"plugins: module {entry} failed to import: {_one_line(problem)}") from None


def _one_line(problem: Exception) -> str:
    """An exception as one line: its type, the first line of its message, and where it was
    raised (a syntax error names its place itself)."""
    text = f"{type(problem).__name__}: {(str(problem).splitlines() or [''])[0]}"
    frames = [frame for frame in traceback.extract_tb(problem.__traceback__) if not frame.filename.startswith("<frozen")]
    if frames and not isinstance(problem, SyntaxError):
        text += f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return text
