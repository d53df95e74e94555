"""PowerGossip: decentralized deep learning with compressed gossip.

`pip install -e .` makes the top-level modules (train, gossip_run, algorithms,
compressors, comm, topologies) and the packages models/ and data/ importable.
"""
from setuptools import setup

setup(
    name="powergossip",
    version="0.1.0",
    description="Decentralized deep learning with compressed communication (PowerGossip, Choco, DeepSqueeze, Moniqua, D-PSGD)",
    license="MIT",
    python_requires=">=3.11",
    py_modules=["train", "gossip_run", "runs", "algorithms", "compressors", "comm", "topologies"],
    packages=["models", "data", "experiments"],
    install_requires=[
        "torch>=2.1",
        "numpy",
        "pyyaml",
        "tensorboard",
        "networkx",
        "matplotlib",
        "tqdm",
        "pytest",
        "mpi4py",
    ],
    extras_require={"vision": ["torchvision"]},
)
