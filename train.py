#!/usr/bin/env python3
"""Decentralized deep learning (the configuration, its comments and the loop: powergossip/train.py).

    python train.py                          # all workers simulated in one process
    mpirun -np 4 python train.py             # one worker per process
    python train.py file.yaml key=value ...

or from Python: `import train; train.config["n_workers"] = 4; train.main()`.

This file is that module itself, not a copy: `import train` here gives `powergossip.train`.
"""
import powergossip

if __name__ == "__main__":  # the command line of the package's module (powergossip/train.py)
    from powergossip import train

    train.command_line()
else:  # `import train`: the package's module itself, so its config, output_dir and hooks are the ones main() reads
    powergossip.alias_root_module(__name__)
