"""The project is described in pyproject.toml. This file exists only so that a pip older than
21.3, which runs `setup.py develop` for `pip install -e .` (and would put the repository root,
with its `data`, `models` and `train`, on every import path), stops with what to do instead."""
import sys

from setuptools import setup

if "develop" in sys.argv[1:]:
    sys.exit("powergossip: an editable install needs pip >= 21.3 and setuptools >= 64 (PEP 660); upgrade them with "
             "`python -m pip install --upgrade pip setuptools`, then `pip install -e .` again")
setup()
