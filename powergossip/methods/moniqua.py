"""Moniqua (Lu, De Sa 2020): 2-bit gossip of the parameters modulo a bound on how far
neighbours differ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from powergossip import kernels
from powergossip.compressors import WorkerRandom, pack_bits, unpack_bits
from powergossip.methods.base import MONIQUA_STREAM, GossipConfig, Method, configured, require, sum_into_workers
from powergossip.methods.registry import register_algorithm


@dataclass(kw_only=True)
class MoniquaConfig(GossipConfig):
    """Moniqua's settings; theta has no default that works for every model: tune it with gamma."""

    theta: float  # bound on how far neighbours' parameters differ: too small breaks the modulo, too large wastes the 2 bits
    seed: int = 0  # the run's seed: the stochastic rounding's per-worker randomness

    def __post_init__(self):
        super().__post_init__()
        require(self.theta is not None and self.theta > 0, "theta", f"must be > 0, got {self.theta}")


class MoniquaGossip(Method):
    """Moniqua (Lu & De Sa 2020), 2-bit, with stochastic rounding:
    delta = 1/3, B = 2 theta / (1 - 2 delta);
    q_i = SR(mod(x_i / B, 1) + 1/2) - 1/2 (4 values: 2 bits each on the wire);
    e_i = q_i B - mod(x_i, B); x_i += gamma sum_{j in N(i)} w_ij (mod(q_j B - x_i, B) - e_i).
    theta must bound how far neighbours' parameters may differ; tune it with gamma."""

    config_class = MoniquaConfig
    delta = 1 / 3

    def __init__(self, comm, topology, config: MoniquaConfig | None = None, **settings):
        config = configured(MoniquaConfig, config, settings)
        super().__init__(comm, topology, config.diffusion_rate)
        self.theta, seed = float(config.theta), config.seed
        self.B = 2 * self.theta / (1 - 2 * self.delta)
        self.randomness = WorkerRandom(seed, comm.local_workers, comm.device, MONIQUA_STREAM)

    @staticmethod
    def modulo(x: torch.Tensor, a: float) -> torch.Tensor:
        """mod(x, a) = fmod(x + sign(x) a/2, a) - sign(x) a/2: zero at multiples of a."""
        return torch.fmod(x + torch.sign(x) * a / 2, a) - torch.sign(x) * a / 2

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        edges = self.comm.half_edges(graph)
        rows = params[0].shape[0]
        senders = self._senders_in_process(graph)
        layout = self._kernel_layout(senders, params)
        if layout is not None:  # the same round in two passes (kernels.py)
            buffers = kernels.flat_buffers(params)
            x = buffers[0][0]
            codes = kernels.moniqua_codes(layout, x, self.randomness.uniform((layout.width,)), self.B, self.delta)
            self.comm.exchange(graph, [pack_bits(codes, 2)], per="worker")
            kernels.moniqua_update(layout, x, codes, senders, edges.weight_in, edges.first_edge, self.B, self.delta, self.diffusion_rate)
            kernels.write_back((params,), buffers)
            return
        x = torch.cat([p.reshape(rows, -1) for p in params], dim=1)
        noise = self.randomness.uniform((x.shape[1],))
        codes = torch.floor((self.modulo(x / self.B, 1.0) + 0.5) / self.delta + noise).clamp_(0, 3)
        q_own = codes * self.delta - 0.5
        error = q_own * self.B - self.modulo(x, self.B)
        packed = pack_bits(codes.to(torch.uint8), 2)
        received = self.comm.exchange(graph, [packed], per="worker")[0]
        if senders is not None:  # every code received is its sender's own: nothing to unpack
            q_neighbors = q_own[senders]
        else:
            q_neighbors = unpack_bits(received, 2, x.shape[1]).float() * self.delta - 0.5
        x_per_edge = x[edges.local_sender]
        corrections = self.modulo(q_neighbors * self.B - x_per_edge, self.B) - error[edges.local_sender]
        arrived = self.arrived(edges)  # a lost message's term is left out: its weight stays with the receiver
        incoming = edges.incoming if arrived is None else edges.incoming * arrived
        x += self.diffusion_rate * sum_into_workers(incoming, corrections)  # sum_{j in N(i)} w_ij (...)
        for p, part in zip(params, x.split([p[0].numel() for p in params], dim=1)):
            p.copy_(part.reshape(p.shape))

    def working_copies(self, degree, shapes):
        return 6.0 * degree + 6.0  # the concatenated x, its codes, errors and modulo terms; per half-edge copies of them

    def state_dict(self):
        return super().state_dict() | {"randomness": self.randomness.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.randomness.load_state_dict(state["randomness"])


register_algorithm("moniqua", MoniquaGossip, config=MoniquaConfig)
