"""PowerSGD (Vogels, Karimireddy, Jaggi 2019) over stacked workers: a compressed all-reduce of
the gradients. (The drop-in for one worker per process, under the reference implementation's
names, is powergossip.optimizer.PowerSGD.)"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from powergossip.compressors import worth_compressing
from powergossip.methods.base import (POWERSGD_STREAM, Method, check_layout, configured, matmul_per_worker, matrix_groups,
                                      matrix_view, orthogonalize_, require)
from powergossip.methods.registry import register_algorithm


@dataclass(kw_only=True)
class PowerSGDConfig:
    """PowerSGD's settings (the paper's defaults), each with what it trades."""

    rank: int = 1  # columns r of P and Q: bytes per matrix per iteration are (m + n) r floats; a better approximation
    num_iterations: int = 1  # power iterations per step: a better approximation of the average, k times the bytes, 2k all-reduces
    min_compression_rate: float = 2.0  # m n / ((m + n) r) below this: sent uncompressed (small matrices gain little)
    start_compressing_after_num_steps: int = 0  # exact all-reduce for this many first steps
    warm_start: bool = True  # Q continues from the previous step (the paper's default) or is redrawn, alike on every worker
    seed: int = 0  # the run's seed: the shared generator of Q

    def __post_init__(self):
        require(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        require(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        require(self.min_compression_rate >= 1, "min_compression_rate",
                f"must be >= 1 (a factor of compression), got {self.min_compression_rate}")
        require(self.start_compressing_after_num_steps >= 0, "start_compressing_after_num_steps",
                f"must be >= 0, got {self.start_compressing_after_num_steps}")


class StackedPowerSGD(Method):
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): the all-reduce of gradients
    through rank-r power iteration, warm-started across steps, with error feedback. It acts
    on gradients: `step(grads)` replaces every worker's gradient `[L, *shape]` by the same
    approximate average, so workers that start equal stay equal (a centralized method; the
    topology is not used and may be None).

    For each gradient G_i of worker i viewed as an m x n matrix (m = shape[0], as PowerGossip
    views parameters), with Q [n, r] shared by all workers:
        M_i = G_i + E_i                          error feedback (Algorithm 2)
        P = mean_i M_i Q;  P = orthogonalize(P)  Algorithm 1: P <- M Q, all-reduce, orthogonalize
        Q = mean_i M_i^T P                       Algorithm 1: Q <- M^T P, all-reduce
        update = P Q^T;  E_i = M_i - update      the decompressed average; the new memory
    Q is orthogonalized before P = M Q (as PyTorch's powerSGD_hook does; it changes no span,
    only keeps Q's scale from drifting over steps). With num_iterations = k the two half-steps
    run k times per step. Vectors (biases, batch norm), matrices compressed by less than
    `min_compression_rate`, and every tensor in the first `start_compressing_after_num_steps`
    steps are all-reduced exactly (and leave no memory).

    Its settings and what they trade: PowerSGDConfig.
    Bytes are counted as for all-reduce (comm.all_reduce_mean): per all-reduce, each worker
    sends its buffer once.
    """

    graph_needs = None
    config_class = PowerSGDConfig

    def __init__(self, comm, topology=None, config: PowerSGDConfig | None = None, **settings):
        config = configured(PowerSGDConfig, config, settings)
        super().__init__(comm, topology)
        self.rank, self.num_iterations = config.rank, config.num_iterations
        self.min_compression_rate, self.warm_start = float(config.min_compression_rate), config.warm_start
        self.start_compressing_after_num_steps, seed = config.start_compressing_after_num_steps, config.seed
        self.generator = torch.Generator(device="cpu")  # the same draws on every worker: Q is shared
        self.generator.manual_seed(int(np.random.SeedSequence([seed, POWERSGD_STREAM]).generate_state(1, np.uint64)[0] >> 1))
        self.groups = None  # [(param indices, m, n, r)]: same-shape matrices are batched
        self.compressed = set()  # the indices in groups: the tensors sent as factors once compressing starts
        self.q = None  # per group [G, n, r], identical on all workers
        self.memory = None  # per parameter [L, *shape] (zeros for the uncompressed ones)
        self._pending = None  # a loaded state waits for the first step, which knows the shapes

    def _init_state(self, grads):
        self.groups = matrix_groups(grads, self.rank, lambda shape: worth_compressing(shape, self.rank, self.min_compression_rate))
        self.compressed = {k for indices, *_ in self.groups for k in indices}
        self.dtype = grads[0].dtype if grads else torch.float32
        self.q = self._draw_q()
        self.memory = [torch.zeros_like(g) for g in grads]

    def _draw_q(self) -> list[torch.Tensor]:
        """Standard normal Q per group, the same draws on every worker (the shared generator)."""
        return [torch.randn((len(indices), n, r), generator=self.generator).to(self.comm.device, self.dtype)
                for indices, m, n, r in self.groups]

    def prepare(self, grads):
        if self.groups is None:
            check_layout(self.comm, grads)
            self._init_state(grads)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.prepare(grads)
        if self._pending is not None:
            self.q = [q.to(self.comm.device, self.dtype, copy=True) for q in self._pending["q"]]
            self.memory = [e.to(self.comm.device).clone() for e in self._pending["memory"]]
            self._pending = None
        compressing = self.round >= self.start_compressing_after_num_steps  # round: the steps done
        present, mine = self.present_rows(self.round)  # workers away this round (faults.py) leave the average
        self.round += 1
        exact = [g for k, g in enumerate(grads) if not (compressing and k in self.compressed)]
        for g, mean in zip(exact, self.comm.all_reduce_mean(exact, present=present)):
            g[mine] = mean.to(g.dtype)
        if not compressing:
            return
        if not self.warm_start:
            self.q = self._draw_q()
        # M_i = G_i + E_i for every group: [L, G, m, n]
        ms = [torch.stack([matrix_view(grads[k], m, n) + matrix_view(self.memory[k], m, n) for k in indices], dim=1)
              for indices, m, n, r in self.groups]
        for _ in range(self.num_iterations):
            for q in self.q:
                orthogonalize_(q)
            ps = self.comm.all_reduce_mean([matmul_per_worker(M, q.expand(len(M), *q.shape)) for M, q in zip(ms, self.q)],
                                           present=present)  # [G, m, r]
            for p in ps:
                orthogonalize_(p)
            self.q = self.comm.all_reduce_mean([matmul_per_worker(M.transpose(-1, -2), p.expand(len(M), *p.shape))
                                                for M, p in zip(ms, ps)], present=present)
        for (indices, m, n, r), M, p, q in zip(self.groups, ms, ps, self.q):
            update = torch.matmul(p, q.transpose(-1, -2))  # [G, m, n], the same on every worker
            for position, k in enumerate(indices):  # a worker away keeps its gradient and its error memory
                matrix_view(self.memory[k], m, n)[mine] = (M[:, position] - update[position])[mine]
                matrix_view(grads[k], m, n)[mine] = update[position].expand_as(M[:, position])[mine]

    def state_dict(self) -> dict:
        if self._pending is not None:  # loaded and not yet put back: it is still the state
            return dict(self._pending)
        state = super().state_dict() | {"generator": self.generator.get_state()}
        if self.groups is not None:
            state |= {"q": [q.clone() for q in self.q], "memory": [e.clone() for e in self.memory]}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self._pending = state if "q" in state else None
        if self._pending is None:  # saved before the first step: the next step draws Q afresh, as a new instance
            self.groups = None


register_algorithm("powersgd", StackedPowerSGD, acts_on="gradients", needs_tuning=False, config=PowerSGDConfig)
