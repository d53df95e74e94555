#!/usr/bin/env python3
"""Consensus experiments (the configuration, its comments and the loop: powergossip/gossip_run.py).

    python gossip_run.py algorithm=power_gossip topology=ring n_workers=8
    mpirun -np 8 python gossip_run.py algorithm=power_gossip n_workers=8   # same numbers

or from Python: `import gossip_run; gossip_run.config["algorithm"] = "moniqua"; gossip_run.main()`.

This file is that module itself, not a copy: `import gossip_run` here gives `powergossip.gossip_run`.
"""
import powergossip

if __name__ == "__main__":  # the command line of the package's module (powergossip/gossip_run.py)
    from powergossip import gossip_run

    gossip_run.command_line()
else:  # `import gossip_run`: the package's module itself, so its config, output_dir and hooks are the ones main() reads
    powergossip.alias_root_module(__name__)
