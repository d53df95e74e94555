"""What Choco and DeepSqueeze share: a compressor, one compressed message per worker per round,
per-worker state, and the mixing of the neighbours' compressed values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from powergossip import compressors, kernels
from powergossip.compressors import Compressor, SignAndNorm, WorkerRandom
from powergossip.methods.base import COMPRESSOR_STREAM, GossipConfig, Method
from powergossip.models.stacked import in_one_buffer, zeros_in_one_buffer


@dataclass(kw_only=True)
class CompressedConfig(GossipConfig):
    """The settings of Choco and DeepSqueeze: the compressor and its own settings."""

    compressor: str = "sign-and-norm"  # a compressors.register_compressor name: sign-and-norm, top-k, random-k, svd, qsgd, identity
    keep_ratio: float | None = None  # top-k / random-k: fraction of entries kept, in (0, 1]; None: rank-matched to `rank`
    rank: int = 1  # svd's rank, and the rank top-k / random-k match in bits when keep_ratio is None
    qsgd_levels: int = 16  # QSGD's levels s: more levels, less quantization error, more bits
    seed: int = 0  # the run's seed: the compressors' per-worker randomness

    def __post_init__(self):
        super().__post_init__()
        self.compressor = compressors.registered_name(self.compressor)
        self.build_compressor()  # the compressor's own checks (SettingErrors naming keep_ratio, rank, qsgd_levels)

    def build_compressor(self) -> Compressor:
        return compressors.build(self.compressor, self.keep_ratio, self.rank, self.qsgd_levels)


def with_compressor(method_class):
    """The registry's factory of a CompressedGossip subclass: its compressor built from the config."""
    def factory(comm, topology, config: CompressedConfig):
        return method_class(comm, topology, config.build_compressor(), diffusion_rate=config.diffusion_rate, seed=config.seed)
    factory.__doc__ = f"{method_class.__name__} with the compressor its CompressedConfig names."
    return factory


class CompressedGossip(Method):
    """What Choco and DeepSqueeze share: a compressor (with per-worker randomness when
    it needs some), one compressed message per worker per round, and per-worker state
    tensors (named in `state_names`) that state_dict saves.

    When every neighbour of the round lives in this process, a received payload is bit for
    bit its sender's own, so its decompression is the sender's own reconstruction: the
    neighbours' sum is taken from the own reconstructions (on a GPU an [L, L] matrix times
    them; on the CPU in each worker's order, as across processes), and the received `[H, ...]`
    copies are never decompressed (the payload still goes through comm.exchange: the wire and
    the byte counts stay those of a run across processes)."""

    state_names: tuple[str, ...] = ()
    own_weight_offset = 0.0  # the worker's own message enters its mix with weight w_ii + this

    def __init__(self, comm, topology, compressor: Compressor, diffusion_rate: float = 1.0, seed: int = 0):
        super().__init__(comm, topology, diffusion_rate)
        self.compressor = compressor
        self.randomness = WorkerRandom(seed, comm.local_workers, comm.device, COMPRESSOR_STREAM) \
            if compressor.needs_randomness else None
        self.state = None  # name -> list of [L, ...] tensors, created at the first step
        self._mixing = None  # (a round's HalfEdges, its [L, L] mixing matrix): a fixed graph's is built once
        self._weights = None  # this round's (w_ii [L], w_ij [H]) under a fault rule (faults.py), else None: the graph's

    def prepare(self, params):
        if self.state is None and params:  # each state in one buffer, which the fused kernels update in place
            self.state = {name: zeros_in_one_buffer(params) for name in self.state_names}

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        self.prepare(params)
        graph = self._sending_graph(graph)
        edges = self.comm.half_edges(graph)
        self._weights = self._fault_weights(edges, self.arrived(edges))
        self._round(graph, edges, self._senders_in_process(graph), params, *(self.state[name] for name in self.state_names))

    def _sending_graph(self, graph):
        """The graph this round's messages travel on: the round's own (Choco leaves out the workers
        that will not publish)."""
        return graph

    def _fault_weights(self, edges, arrived):
        """This round's (w_ii `[L]`, w_ij `[H]`) under faults, or None for the round graph's. A lost
        message's weight w_ij moves to the receiver's w_ii (D-PSGD's rule; `arrived`: Method.arrived)."""
        if arrived is None:
            return None
        weight_in = edges.weight_in * arrived
        return edges.weight_self.index_add(0, edges.local_sender, edges.weight_in - weight_in), weight_in

    def _round(self, graph, edges, senders, params, *states) -> None:
        """The method's round: `states` are its per-worker state tensors, in `state_names` order."""
        raise NotImplementedError

    def _own_weights(self, edges) -> torch.Tensor:
        """w_ii + own_weight_offset this round (_fault_weights)."""
        return (edges.weight_self if self._weights is None else self._weights[0]) + self.own_weight_offset

    def _weights_in(self, edges) -> torch.Tensor:
        """w_ij of every local half-edge this round (_fault_weights)."""
        return edges.weight_in if self._weights is None else self._weights[1]

    def _incoming(self, edges) -> torch.Tensor:
        return edges.incoming if self._weights is None else edges.incoming_of(self._weights[1])

    def _mixing_matrix(self, edges, senders) -> torch.Tensor:
        """A `[L, L]`: A[i, k] = (w_ii + own_weight_offset) [k = i] + sum_h incoming[i, h] [senders[h] = k],
        for the round's `edges` (comm keeps one HalfEdges per graph, so a fixed graph's is reused)."""
        if self._weights is not None:  # this round's own
            return torch.diag(self._own_weights(edges)).index_add_(1, senders, self._incoming(edges))
        if self._mixing is None or self._mixing[0] is not edges:
            self._mixing = (edges, torch.diag(self._own_weights(edges)).index_add_(1, senders, edges.incoming))
        return self._mixing[1]

    def _fused_sign_and_norm(self, senders, params, *states):
        """The flat layout when this round runs the fused sign-and-norm kernels, else None."""
        if self._on_torch_path():
            return None
        if type(self.compressor) is not SignAndNorm:
            self._use_fused(f"no fused kernel for the {type(self.compressor).__name__} compressor")
            return None
        return self._kernel_layout(senders, params, *states)

    def _fused_round(self, graph, edges, senders, layout, params, states, b_sign: int, update) -> None:
        """A sign-and-norm round in two passes (kernels.py): the payload C(x_i + b_sign states[0]_i)
        from one pass, sent as the torch path sends it, then `update` (a kernels launcher) of x and
        the states in place with the scales and the `[L, L]` mixing matrix."""
        buffers = kernels.flat_buffers(params, *states)
        x, *flat_states = (buffer for buffer, _ in buffers)
        payload = kernels.sign_and_norm(layout, x, flat_states[0], b_sign)
        self.comm.exchange(graph, payload, per="worker")
        update(layout, x, *flat_states, payload[1], self._mixing_matrix(edges, senders), self.diffusion_rate)
        kernels.write_back((params, *states), buffers)

    def _compress_and_exchange(self, graph, edges, senders, tensors):
        """Send q_i = C(tensors_i) to the neighbours of `graph` (`senders`: _senders_in_process(graph)).
        Returns q `[L, ...]` as each worker reconstructs it, and per tensor its mix `[L, ...]`:
        (w_ii + own_weight_offset) q_i + sum_{j in N(i)} w_ij q_j for every local worker i. When
        every message stays in the process nothing is decoded: the neighbours' q_j are the workers'
        own reconstructions. On a GPU the mix is one matrix product per tensor; on the CPU each
        worker's terms are added in their fixed order (`_mix_in_order`), the same bits in every layout."""
        payload = self.compressor.compress(tensors, self.randomness)
        received = self.comm.exchange(graph, payload, per="worker")
        on_cpu = tensors[0].device.type == "cpu"
        if senders is not None:
            own = self.compressor.reconstruct(tensors, payload)
            if not on_cpu:
                return own, self._mix(self._mixing_matrix(edges, senders), own)
            return own, self._mix_in_order(edges, own, own, senders)
        # the own and the received payloads decompressed together
        values = self.compressor.decompress([torch.cat(pair) for pair in zip(payload, received)], [t.shape[1:] for t in tensors])
        own = [v[:self.comm.num_local] for v in values]
        if not on_cpu:
            return own, self._mix(torch.cat([torch.diag(self._own_weights(edges)), self._incoming(edges)], dim=1), values)
        return own, self._mix_in_order(edges, own, values, self.comm.num_local + torch.arange(edges.num, device=edges.slot.device))

    @staticmethod
    def _mix(A: torch.Tensor, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """A @ rows[k] for each tensor (A `[L, R]`, rows[k] `[R, ...]`): one matrix product per tensor."""
        return [(A.to(r.dtype) @ r.reshape(r.shape[0], -1)).view((A.shape[0],) + tuple(r.shape[1:])) for r in rows]

    def _mix_in_order(self, edges, own, sources, source_rows) -> list[torch.Tensor]:
        """(w_ii + own_weight_offset) own_i + sum over worker i's half-edges h, in their order, of
        w_h q_h, where q_h is row source_rows[h] of each tensor's `sources`: the own term, then per
        slot (a worker's first, second, ... half-edge) one product and one sum, each its own
        elementwise pass, so a worker's terms meet in the same order and roundings in every layout."""
        shaped = lambda weights, t: weights.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1))
        mixed = [o * shaped(self._own_weights(edges), o) for o in own]
        for slot in range(edges.max_degree):
            half_edges = torch.nonzero(edges.slot == slot).flatten()
            workers, weights, rows = edges.local_sender[half_edges], self._weights_in(edges)[half_edges], source_rows[half_edges]
            for m, source in zip(mixed, sources):
                m.index_add_(0, workers, source[rows] * shaped(weights, source))
        return mixed

    def working_copies(self, degree, shapes):
        # Its states, the difference it compresses, the reconstruction and the mixed sum; across processes
        # also every received payload decompressed
        return 2.0 * len(self.state_names) + 2.0 + (degree + 1.0 if self.comm.world_size > 1 else 0.0)

    def state_dict(self):
        state = super().state_dict()
        if self.state is not None:
            state |= {name: [t.clone() for t in ts] for name, ts in self.state.items()}
        if self.randomness is not None:
            state["randomness"] = self.randomness.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if all(name in state for name in self.state_names):
            self.state = {name: in_one_buffer([t.to(self.comm.device) for t in state[name]]) for name in self.state_names}
        if self.randomness is not None:
            self.randomness.load_state_dict(state["randomness"])
