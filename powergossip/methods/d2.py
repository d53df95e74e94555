"""D² (Tang, Lian, Yan, Zhang, Liu, ICML 2018, "D²: Decentralized training over decentralized
data"), also exact diffusion: gossip that corrects for the workers' different data."""
from __future__ import annotations

import numpy as np

from powergossip import topologies
from powergossip.errors import require
from powergossip.methods.corrected import CorrectedGossip
from powergossip.methods.registry import register_algorithm

LAMBDA_MIN = -1 / 3 + 1e-9  # D² needs lambda_min(W) > -1/3; an even ring with weights 1/3 sits exactly at -1/3


class D2(CorrectedGossip):
    """D² after the local step: x^{t+1} = W (x^{t+1/2} + c^t), c^{t+1} = x^{t+1} - x^t - u^t
    = x^{t+1} - x^{t+1/2}, c^0 = 0; with u^t = -gamma_lr g^t this is Tang et al.'s
    X_{t+1} = W (2 X_t - X_{t-1} - gamma_lr (G_t - G_{t-1})). So it keeps c^t only, not x^t.

    Needs a fixed symmetric W_gamma = (1 - gamma) I + gamma W with lambda_min > -1/3 (refused at
    lambda_min <= -1/3 + 1e-9; diffusion_rate 0.5 mixes with (I + W) / 2, whose lambda_min >= 0).
    Bytes: one vector per edge per round.

    Faults (faults.py): a round with links down or workers away mixes with its own W, whose cut
    weights sit on both ends' own: still symmetric and doubly stochastic, so the corrections keep
    summing to 0 and a consensus at the minimiser stays a fixed point: D² stays exact
    (docs/algorithms.md). A message lost one way has D-PSGD's rule and no fix: that breaks it."""

    graph_needs = "fixed_symmetric"

    # Settings from the signature, not a config: a run's checks before any work then build it
    # (registry.check), and so refuse lambda_min <= -1/3 there too.
    def __init__(self, comm, topology, diffusion_rate: float = 1.0):
        super().__init__(comm, topology, diffusion_rate=diffusion_rate)
        # on the fault-free W: a round's W with faults adds w_ij (e_i - e_j)(e_i - e_j)^T >= 0 per cut edge, never lower
        W = topologies.fault_free(topology).at(0).diffusion_matrix
        lowest = 1 - diffusion_rate + diffusion_rate * np.linalg.eigvalsh(W)[0]
        require(lowest > LAMBDA_MIN, "diffusion_rate",
                f"must leave the mixing matrix's smallest eigenvalue above -1/3 (D² needs it): {topology.name} at "
                f"diffusion_rate {diffusion_rate:g} has {lowest:.6g}; set it to 0.5 (D² then mixes with (I + W) / 2)")

    def step(self, params):
        self.start(params)
        for x, c in zip(params, self.correction):
            c.add_(x)  # x^{t+1/2} + c^t
        self.mix(self.correction)  # x^{t+1}
        for x, c in zip(params, self.correction):
            c.sub_(x)  # c^{t+1} = x^{t+1} - x^{t+1/2}
            x.add_(c)  # x^{t+1}


register_algorithm("d2", D2, needs_tuning=False, local_step_first=True)
