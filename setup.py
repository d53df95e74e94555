"""PowerGossip: decentralized deep learning with compressed gossip.

`pip install -e .` puts one name on the import path, `powergossip`, through which the
repository's modules are importable from anywhere (`powergossip.algorithms`,
`powergossip.train`, ...; see powergossip/__init__.py). Generic names such as `data`
or `models` stay free for a user's own project.
"""
from setuptools import setup

setup(
    name="powergossip",
    version="0.1.0",
    description="Decentralized deep learning with compressed communication (PowerGossip, Choco, DeepSqueeze, Moniqua, D-PSGD)",
    license="MIT",
    python_requires=">=3.11",
    packages=["powergossip"],
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
