"""Tensor codecs for Choco-Gossip and DeepSqueeze (Koloskova et al. 2019, Tang et al. 2019),
as the PowerGossip paper runs them.

A compressor turns a list of stacked tensors `[R, *shape_k]` (R rows: local workers)
into a *payload*: a short list of tensors `[R, ...]` that are exactly what crosses
the wire (signs packed 8 per byte, indices in the smallest integer type that holds
them). `decompress` turns payload rows back into `[R, *shape_k]` tensors. Bits sent
are the payload's bytes times 8: nothing is counted that is not sent.

    payload = compressor.compress(tensors, randomness)   # randomness: WorkerRandom or None
    tensors = compressor.decompress(payload, shapes)     # shapes: per-row shapes

Compression is per tensor (a norm per tensor, k per tensor), batched over rows and
over tensors: no Python loop over workers or neighbours. The payload sizes are
tabled in docs/algorithms.md ("Counting communication").
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from powergossip import kernels, names
from powergossip.errors import SettingError
from powergossip.per_worker import matmul_per_worker, svd_per_worker


class WorkerRandom:
    """One random stream per worker, seeded by (seed, worker): the same numbers for a
    worker in every launch layout on the same kind of device (a GPU's generator gives
    other numbers than the CPU's). `uniform(shape)` returns `[L, *shape]` in [0, 1)."""

    def __init__(self, seed: int, workers: range, device: torch.device, purpose: int = 0):
        self.device = torch.device(device)
        self.generators = []
        for worker in workers:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(np.random.SeedSequence([seed, purpose, worker]).generate_state(1, np.uint64)[0] >> 1))
            self.generators.append(generator)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        # Drawn where they are used: drawing on the CPU and copying was the bottleneck on GPUs.
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])

    def state_dict(self) -> dict:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(saved)


# --- bit packing (plain torch, no CUDA extension) ---------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`[R, N]` integer codes < 2**bits (or booleans) -> `[R, ceil(N * bits / 8)]` uint8 (bits in 1, 2, 4, 8)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    if codes.is_cuda and kernels.triton is not None and codes.dtype != torch.bool:
        return kernels.pack_bits(codes, bits)  # the same bytes in one kernel
    per_byte = 8 // bits
    rows, n = codes.shape
    num_bytes = -(-n // per_byte)
    padded = torch.zeros((rows, num_bytes * per_byte), dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    return (padded.view(rows, num_bytes, per_byte) << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `[R, bytes]` uint8 -> `[R, n]` uint8 codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], packed.shape[1] * per_byte)[:, :n]


def smallest_index_dtype(count: int) -> torch.dtype:
    """The smallest integer dtype that holds indices 0 .. count-1."""
    if count <= 2**8:
        return torch.uint8
    if count <= 2**15:
        return torch.int16
    if count <= 2**31:
        return torch.int32
    return torch.int64


def bits_per_level(levels: int) -> int:
    """Bits for level codes 0..levels, rounded up to a packable width."""
    needed = max(1, math.ceil(math.log2(levels + 1)))
    return next(b for b in (1, 2, 4, 8) if b >= needed) if needed <= 8 else 16


def matrix_shape(shape, rank: int = 1) -> tuple[int, int, int]:
    """One worker's tensor of `shape` seen as an m x n matrix (m = shape[0], n the rest, as
    PowerSGD and PowerGossip view parameters; a scalar is 1 x 1) and the rank min(rank, m, n)
    a rank-`rank` method uses on it."""
    m = shape[0] if len(shape) else 1
    n = math.prod(shape) // m
    return m, n, min(rank, m, n)


def worth_compressing(shape, rank: int, min_compression_rate: float) -> bool:
    """PowerSGD's rule (Vogels et al. 2019, Section 4): a tensor of `shape` (one worker's) is
    compressed when it is a matrix whose rank-r factors are at least `min_compression_rate`
    times smaller than it, m n / ((m + n) r) >= min_compression_rate; vectors never are."""
    if len(shape) < 2:
        return False
    m, n, r = matrix_shape(shape, rank)
    return m * n >= min_compression_rate * (m + n) * r


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    rows = tensors[0].shape[0]
    return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    rows = flat.shape[0]
    sizes = [math.prod(s) for s in shapes]
    return [part.reshape((rows,) + tuple(s)) for part, s in zip(flat.split(sizes, dim=1), shapes)]


class Compressor:
    """Interface. Subclasses say whether they need per-worker randomness."""

    needs_randomness = False

    def compress(self, tensors: list[torch.Tensor], randomness: WorkerRandom | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def decompress(self, payload: list[torch.Tensor], shapes: list[torch.Size]) -> list[torch.Tensor]:
        raise NotImplementedError

    def reconstruct(self, tensors: list[torch.Tensor], payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """C(tensors) as their sender holds it, given the payload `compress(tensors)` made: bit for
        bit `decompress(payload, shapes)`, which a compressor may get more cheaply from the tensors."""
        return self.decompress(payload, [t.shape[1:] for t in tensors])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Identity(Compressor):
    """No compression: float32 values (Choco with it is plain gossip with step gamma)."""

    def compress(self, tensors, randomness=None):
        return [_flatten(tensors).float()]

    def decompress(self, payload, shapes):
        return _split(payload[0], shapes)


class SignAndNorm(Compressor):
    """(||t||_1 / numel) * sign(t) per tensor; wire: 1 bit per entry + one float per tensor.

    sign(0) is sent as +1 (one bit has no room for a zero)."""

    def compress(self, tensors, randomness=None):
        rows = tensors[0].shape[0]
        signs = torch.cat([t.reshape(rows, -1) >= 0 for t in tensors], dim=1)  # 1 byte per entry: no float copy
        # abs().mean(), not linalg.vector_norm(ord=1) / numel: that sums in another order (other bits)
        scales = torch.stack([t.reshape(rows, -1).float().abs().mean(dim=1) for t in tensors], dim=1)
        return [pack_bits(signs, 1), scales]

    def decompress(self, payload, shapes):
        packed, scales = payload
        total = sum(math.prod(s) for s in shapes)
        signs = unpack_bits(packed, 1, total).float() * 2 - 1
        return [part * scales[:, k].view((-1,) + (1,) * len(s)) for k, (part, s) in enumerate(zip(_split(signs, shapes), shapes))]

    def reconstruct(self, tensors, payload):
        # The signs from the tensors themselves, nothing unpacked: (+-1) * scale is +-scale exactly
        # (a NaN scale may come out with the other sign bit, still NaN).
        out = []
        for k, t in enumerate(tensors):
            scale = payload[1][:, k].view((-1,) + (1,) * (t.dim() - 1))
            out.append(torch.where(t >= 0, scale, -scale))
        return out


class TopK(Compressor):
    """The k = max(1, floor(numel * keep_ratio)) largest magnitudes of each tensor:
    float32 values and indices in the smallest integer type for that tensor.

    `rank` instead of `keep_ratio` matches a rank-r low-rank compressor:
    keep_ratio = (m + n) / (2 m n) * rank / 2 (the paper's rank-matched top-k)."""

    def __init__(self, keep_ratio: float | None = None, rank: int | None = None):
        if (keep_ratio is None) == (rank is None):
            raise SettingError("keep_ratio", "or rank: TopK takes exactly one of keep_ratio (in (0, 1]) or rank (>= 1)")
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise SettingError("keep_ratio", f"must be in (0, 1], got {keep_ratio}")
        if rank is not None and rank < 1:
            raise SettingError("rank", f"must be >= 1, got {rank}")
        self.keep_ratio, self.rank = keep_ratio, rank

    def num_kept(self, shape: torch.Size) -> int:
        numel = math.prod(shape)
        keep_ratio = self.keep_ratio
        if keep_ratio is None:
            m, n, _ = matrix_shape(shape)
            keep_ratio = (m + n) / (2 * m * n) * self.rank / 2
        return min(numel, max(1, int(numel * keep_ratio)))

    def _select(self, flat: torch.Tensor, k: int, randomness) -> torch.Tensor:
        return flat.abs().topk(k, dim=1, sorted=False).indices

    def compress(self, tensors, randomness=None):
        values, indices = [], {}
        for t in tensors:
            flat = t.reshape(t.shape[0], -1).float()
            positions = self._select(flat, self.num_kept(t.shape[1:]), randomness)
            values.append(flat.gather(1, positions))
            indices.setdefault(smallest_index_dtype(flat.shape[1]), []).append(positions)
        # One payload tensor per index dtype, in a fixed dtype order.
        return [torch.cat(values, dim=1)] + [
            torch.cat(indices[d], dim=1).to(d) for d in (torch.uint8, torch.int16, torch.int32, torch.int64) if d in indices]

    def decompress(self, payload, shapes):
        values, index_parts = payload[0], list(payload[1:])
        rows = values.shape[0]
        by_dtype = {}
        for s in shapes:
            by_dtype.setdefault(smallest_index_dtype(math.prod(s)), []).append(self.num_kept(s))
        cursors = {d: 0 for d in by_dtype}
        index_of = {d: part for d, part in zip([d for d in (torch.uint8, torch.int16, torch.int32, torch.int64) if d in by_dtype], index_parts)}
        out, value_cursor = [], 0
        for s in shapes:
            k, d = self.num_kept(s), smallest_index_dtype(math.prod(s))
            positions = index_of[d][:, cursors[d]:cursors[d] + k].long()
            cursors[d] += k
            dense = torch.zeros((rows, math.prod(s)), dtype=torch.float32, device=values.device)
            dense.scatter_(1, positions, values[:, value_cursor:value_cursor + k])
            value_cursor += k
            out.append(dense.reshape((rows,) + tuple(s)))
        return out


class RandomK(TopK):
    """k entries of each tensor drawn uniformly without replacement (per-worker randomness)."""

    needs_randomness = True

    def _select(self, flat, k, randomness):
        if randomness is None:
            raise ValueError("RandomK needs a WorkerRandom")
        return randomness.uniform((flat.shape[1],)).topk(k, dim=1, sorted=False).indices


class SVD(Compressor):
    """Best rank-r approximation of each tensor viewed as a matrix (m = shape[0]):
    sends U_r S_r (m x r) and V_r (n x r) as float32."""

    def __init__(self, rank: int = 1):
        if rank < 1:
            raise SettingError("rank", f"must be >= 1, got {rank}")
        self.rank = rank

    def compress(self, tensors, randomness=None):
        factors = []
        for t in tensors:
            m, n, r = matrix_shape(t.shape[1:], self.rank)
            u, s, vh = svd_per_worker(t.reshape(t.shape[0], m, n).float())
            factors += [(u[:, :, :r] * s[:, None, :r]).reshape(t.shape[0], -1), vh[:, :r, :].transpose(1, 2).reshape(t.shape[0], -1)]
        return [torch.cat(factors, dim=1)]

    def decompress(self, payload, shapes):
        flat, out, cursor = payload[0], [], 0
        rows = flat.shape[0]
        for s in shapes:
            m, n, r = matrix_shape(s, self.rank)
            us = flat[:, cursor:cursor + m * r].reshape(rows, m, r)
            v = flat[:, cursor + m * r:cursor + (m + n) * r].reshape(rows, n, r)
            cursor += (m + n) * r
            out.append(matmul_per_worker(us, v.transpose(1, 2)).reshape((rows,) + tuple(s)))
        return out


class QSGD(Compressor):
    """QSGD with s levels (Alistarh et al. 2017): per tensor the 2-norm, and for each
    entry its sign and level floor(|v| / norm * s + u), u ~ U[0, 1) (unbiased).
    Wire: one float per tensor, signs 8 per byte, levels packed in the fewest bits.

    `rescale` (default, as in the Choco paper): the output is divided by
    tau = 1 + min(d / s^2, sqrt(d) / s) (d = numel), which makes the compressor
    contractive, ||C(x) - x||^2 <= (1 - 1/tau) ||x||^2, as Choco and DeepSqueeze need;
    unbiased QSGD's error grows with d and makes them diverge on large tensors."""

    needs_randomness = True

    def __init__(self, levels: int = 16, rescale: bool = True):
        if levels < 1:
            raise SettingError("qsgd_levels", f"(QSGD's levels) must be >= 1, got {levels}")
        self.levels, self.rescale = levels, rescale

    def _scale(self, shape) -> float:
        d = math.prod(shape)
        return 1 / (1 + min(d / self.levels**2, math.sqrt(d) / self.levels)) if self.rescale else 1.0

    def compress(self, tensors, randomness=None):
        if randomness is None:
            raise ValueError("QSGD needs a WorkerRandom")
        flat = _flatten(tensors).float()
        norms = torch.stack([t.reshape(t.shape[0], -1).float().norm(dim=1) for t in tensors], dim=1)
        sizes = [math.prod(t.shape[1:]) for t in tensors]
        norm_per_entry = torch.repeat_interleave(norms, torch.tensor(sizes, device=flat.device), dim=1)
        scaled = flat.abs() / norm_per_entry.clamp_min(torch.finfo(torch.float32).tiny) * self.levels
        levels = torch.floor(scaled + randomness.uniform((flat.shape[1],))).clamp_(max=self.levels)
        bits = bits_per_level(self.levels)
        packed_levels = pack_bits(levels.to(torch.uint8), bits) if bits <= 8 else levels.to(torch.int16)
        return [pack_bits((flat >= 0).to(torch.uint8), 1), packed_levels, norms]

    def decompress(self, payload, shapes):
        packed_signs, packed_levels, norms = payload
        total = sum(math.prod(s) for s in shapes)
        bits = bits_per_level(self.levels)
        levels = unpack_bits(packed_levels, bits, total) if bits <= 8 else packed_levels
        signed = (unpack_bits(packed_signs, 1, total).float() * 2 - 1) * levels.float() / self.levels
        return [part * norms[:, k].view((-1,) + (1,) * len(s)) * self._scale(s)
                for k, (part, s) in enumerate(zip(_split(signed, shapes), shapes))]


# --- the registry: compressors by name ---------------------------------------------------------
# name -> factory(keep_ratio, rank, qsgd_levels) -> Compressor. A new compressor is one class
# plus one `register_compressor` line; every entrypoint and method that takes a compressor
# by name finds it here.
COMPRESSORS: dict[str, Callable[..., Compressor]] = {}


def register_compressor(name: str, factory: Callable[..., Compressor]) -> None:
    """Make `factory(keep_ratio, rank, qsgd_levels)` available as compressor `name`."""
    COMPRESSORS[names.canonical_name(name)] = factory


def registered_name(name: str) -> str:
    """The registry key of compressor `name` (either spelling, aliases included)."""
    key = names.lookup(COMPRESSORS, names.COMPRESSOR_ALIASES, name)
    if key is None:
        raise SettingError("compressor", f"{name!r} is unknown; registered: {', '.join(COMPRESSORS)}")
    return key


def build(name: str, keep_ratio: float | None = None, rank: int | None = None, levels: int = 16) -> Compressor:
    """The compressor registered as `name` (aliases: sign, topk, randomk, fp). top-k and
    random-k take keep_ratio, or rank to match a rank-r method's bits."""
    return COMPRESSORS[registered_name(name)](keep_ratio, rank, levels)


register_compressor("identity", lambda keep_ratio, rank, levels: Identity())
register_compressor("sign-and-norm", lambda keep_ratio, rank, levels: SignAndNorm())
register_compressor("top-k", lambda keep_ratio, rank, levels: TopK(keep_ratio, None if keep_ratio is not None else rank))
register_compressor("random-k", lambda keep_ratio, rank, levels: RandomK(keep_ratio, None if keep_ratio is not None else rank))
register_compressor("svd", lambda keep_ratio, rank, levels: SVD(rank=1 if rank is None else rank))
register_compressor("qsgd", lambda keep_ratio, rank, levels: QSGD(levels=levels))
