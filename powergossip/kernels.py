"""Triton kernels that fuse a gossip round's passes over the parameters (CUDA).

With many workers in one process, Choco, DeepSqueeze and Moniqua are limited by memory
traffic: their rounds written as torch operations make a dozen or more passes over the
`[L, N]` parameters and states (the difference, the signs, the norms, the reconstruction,
each state update), each a kernel that reads and writes the whole model. Here each of
those rounds is two passes: the first reads what the compressor needs once and writes the
message (a byte per sign or 2-bit code, at its place in the worker's concatenated row, and
per-block sums of |value|; two small kernels then pack the bytes as `compressors.pack_bits`
does and sum the blocks per tensor), the second reads the states once, applies the paper's
update for all L workers of a column block at a time (the neighbours' sum is an `[L, L]`
matrix product in registers) and writes them back in place. PowerGossip's half-step (a
product of every worker's matrices with its half-edges' factors, then a low-rank update of
each matrix) is a few launches over all matrices at once instead of a few per matrix
(`MatrixLayout`); its messages still go through `comm.exchange`, so it runs across processes
too.

What goes on the wire is unchanged: the same packed bits from the same values, in the same
payload tensors (`comm.exchange` counts them), so the CPU, the plain-torch GPU path and this
one send the same number of bytes (PowerGossip: the same floats, one message of all groups
instead of one per group). The sign bits and Moniqua's codes are those of the plain-torch
path bit for bit; the per-tensor scale of sign-and-norm, PowerGossip's products and the state
updates are sums taken in another order, equal to float rounding (tests/test_fused_kernels.py
compares the two paths on a GPU).

The kernels work on flat tensor-major buffers: tensor k's `[L, n_k]` stack occupies
`L * n_k` consecutive floats (what `torch.cat([t.reshape(-1) for t in stacks])` gives, and
how `models.stacked.StackedReplicas` allocates its parameters, so that no copy is needed).
PowerGossip's matrices are a subset of those stacks, with vectors between them
(`in_one_storage`: their offsets in the stretch of storage that holds them all). Used by
the methods (powergossip/methods/) and compressors.pack_bits when the tensors are on a CUDA device and Triton imports (or under Triton's
CPU interpreter, TRITON_INTERPRET=1, which the tests use on CPU).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from powergossip.models.stacked import views

try:  # CUDA machines have Triton with torch; the CPU build has not, and needs none of this
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None


# Triton's own switch, read when it compiles the kernels below: on, they run on CPU tensors (slowly).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(*stack_lists: list[torch.Tensor]) -> bool:
    """Whether the fused kernels run on these stacks: all float32, on a CUDA device with Triton
    (or on any device under Triton's CPU interpreter)."""
    tensors = [t for stacks in stack_lists for t in stacks]
    return triton is not None and all(t.dtype == torch.float32 and (t.is_cuda or INTERPRETED) for t in tensors)


# --- the flat layout ------------------------------------------------------------------------
MAX_ROWS = 64  # column-block kernels hold all L rows of a block; beyond this, the plain path
TILE_ENTRIES = 4096  # rows x columns a program holds (its registers): the column block is this / rows


def _starts(sizes) -> np.ndarray:
    """Where each of consecutive pieces of these sizes starts (int64)."""
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]])


def _on_device(values, device) -> torch.Tensor:
    """Indices or offsets computed on the host, as an int64 tensor on `device` (once per layout)."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device)


class Layout:
    """Where each stack `[L, *shape_k]` lies in a flat tensor-major buffer, where its columns
    lie in a worker's concatenated row (`compressors` orders per-worker payloads that way),
    and the column blocks the kernels work on (a block never straddles two tensors)."""

    def __init__(self, stacks: list[torch.Tensor]):
        self.shapes = [t.shape for t in stacks]  # what it was built for
        self.rows = stacks[0].shape[0]
        self.padded_rows = max(16, 1 << (self.rows - 1).bit_length())  # tl.dot wants >= 16 rows
        self.block = max(32, TILE_ENTRIES // self.padded_rows)  # columns per block
        sizes = np.array([t[0].numel() for t in stacks], dtype=np.int64)
        self.sizes, self.width = sizes, int(sizes.sum())
        bases = _starts(sizes * self.rows)  # flat offset of each stack
        columns = _starts(sizes)  # offset in a worker's concatenated row
        blocks = -(-sizes // self.block)
        self.num_blocks = int(blocks.sum())
        first_block = np.concatenate([[0], np.cumsum(blocks)])
        block_tensor = np.repeat(np.arange(len(stacks)), blocks)
        block_column = (np.arange(self.num_blocks) - first_block[block_tensor]) * self.block
        as_device = lambda values: _on_device(values, stacks[0].device)
        self.bases, self.lengths, self.columns = as_device(bases), as_device(sizes), as_device(columns)
        self.block_tensor, self.block_column, self.first_block = as_device(block_tensor), as_device(block_column), as_device(first_block)


def in_one_storage(stacks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """A flat tensor over the stretch of storage that holds all the stacks, and each stack's offset
    in it, when they are contiguous and share one storage (the parameters of
    `models.stacked.StackedReplicas`, also a subset of them); else None."""
    if not stacks:
        return None
    storage = stacks[0].untyped_storage().data_ptr()
    if not all(t.is_contiguous() and t.untyped_storage().data_ptr() == storage for t in stacks):
        return None
    low = min(t.storage_offset() for t in stacks)
    high = max(t.storage_offset() + t.numel() for t in stacks)
    return stacks[0].as_strided((high - low,), (1,), low), [t.storage_offset() - low for t in stacks]


def flat(stacks: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The stacks as one flat tensor-major buffer, and whether it is a copy (to write back with
    `write_back`): no copy when they already lie back to back in one storage."""
    storage = in_one_storage(stacks)
    if storage is not None and storage[1] == _starts([t.numel() for t in stacks]).tolist():  # back to back, in order
        return storage[0], False
    return torch.cat([s.reshape(-1) for s in stacks]), True


def flat_buffers(*stack_lists: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` of each list of stacks; `write_back` puts what changed in copies back."""
    return [flat(stacks) for stacks in stack_lists]


def write_back(stack_lists, buffers) -> None:
    """Copy the buffers that `flat_buffers` had to gather back into their stacks."""
    for stacks, (buffer, copied) in zip(stack_lists, buffers):
        if copied:
            torch._foreach_copy_(stacks, views(buffer, stacks))


MAX_FACTOR_ENTRIES = 16384  # entries of a factor (padded length x padded rank) a program orthogonalizes in registers; beyond, torch
MAX_FACTOR_COLUMNS = 16  # half-edges x rank of one worker the kernels hold side by side; beyond, torch


class MatrixLayout:
    """PowerGossip's matrices `[L, m_k, n_k]` (its groups' order: group by group, each group's
    matrices in turn) for the kernels that treat all of them in one launch: where each lies in
    the parameters' storage (`in_one_storage`), where its factors lie in a half-edge's flat row
    of P `[H, sum_k m_k r_k]` and Q `[H, sum_k n_k r_k]` (entry (i, c) of matrix k at
    offset_k + i r_k + c: the groups' pools `[H, G, m, r]` concatenated), and the tiles of each
    kernel (a tile never straddles two matrices)."""

    # Tile shapes, measured on an H200 with ResNet-18's matrices (benchmarks/README.md): 3.1 to 3.5 TB/s
    COLUMNS = 256  # columns of a program of X^T P (it sums over all rows of them)
    ROWS = 8  # rows of a program of X Q (it sums over all columns of them)
    UPDATE = (8, 256)  # rows x columns of a program of the update
    ENTRIES = 4096  # products (entries x factor columns) a program of X^T P or X Q sums per step, in registers

    def __init__(self, groups, offsets: list[int], device):
        self.offsets = offsets  # what it was built for: in_one_storage's offsets of the stacks
        matrices = [(offsets[index], m, n, r) for indices, m, n, r in groups for index in indices]
        base, m, n, r = (np.array(column, dtype=np.int64) for column in zip(*matrices))
        self.p_width, self.q_width = int((m * r).sum()), int((n * r).sum())
        self.p_block, self.q_block = (1 << (int(lengths.max()) - 1).bit_length() for lengths in (m, n))  # Triton wants powers of two
        self.max_rank = int(r.max())
        self.rank_columns = 1 << (self.max_rank - 1).bit_length()  # a power of two, as Triton's tiles want
        as_device = lambda values: _on_device(values, device)
        self.base, self.m, self.n, self.r = (as_device(v) for v in (base, m, n, r))
        self.p_offset, self.q_offset = as_device(_starts(m * r)), as_device(_starts(n * r))
        self.num_matrices = len(matrices)
        # Tiles (matrix, first row, first column): over columns for X^T P, over rows for X Q, over both for the update
        self.column_tiles = self._tiles(m, n, m.max(), self.COLUMNS, as_device)
        self.row_tiles = self._tiles(m, n, self.ROWS, n.max(), as_device)
        self.update_tiles = self._tiles(m, n, *self.UPDATE, as_device)

    @staticmethod
    def _tiles(m, n, rows, columns, as_device):
        """(matrix, first row, first column) of every tile of `rows` x `columns`, matrix by matrix."""
        firsts = [np.stack(np.meshgrid(np.arange(0, m_k, rows), np.arange(0, n_k, columns), indexing="ij")).reshape(2, -1)
                  for m_k, n_k in zip(m, n)]
        matrix = np.repeat(np.arange(len(firsts)), [f.shape[1] for f in firsts])
        first_row, first_column = np.concatenate(firsts, axis=1)
        return as_device(matrix), as_device(first_row), as_device(first_column)


if triton is not None:  # the kernels; their launchers follow
    @triton.jit
    def _block_of(pid, block_tensor, block_column, bases, lengths, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.load(block_tensor + pid)
        n = tl.load(lengths + k)
        rows = tl.arange(0, ROWS)
        cols = tl.load(block_column + pid) + tl.arange(0, BLOCK)
        return k, n, rows, cols, tl.load(bases + k) + rows[:, None] * n + cols[None, :]

    @triton.jit
    def signs_and_partial_sums_kernel(a, b, b_sign: tl.constexpr, signs, partials, block_tensor, block_column, bases, lengths,
                                      columns, L, width, num_blocks, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """v = a + b_sign * b over one column block of every row: v >= 0 as bytes at the worker's
        concatenated position, and sum |v| per row into partials[row, block]."""
        pid = tl.program_id(0)
        k, n, rows, cols, at = _block_of(pid, block_tensor, block_column, bases, lengths, ROWS, BLOCK)
        inside = (rows[:, None] < L) & (cols[None, :] < n)
        v = tl.load(a + at, mask=inside, other=0.0)
        if b_sign > 0:
            v = v + tl.load(b + at, mask=inside, other=0.0)
        else:
            v = v - tl.load(b + at, mask=inside, other=0.0)
        position = rows[:, None].to(tl.int64) * width + tl.load(columns + k) + cols[None, :]
        tl.store(signs + position, (v >= 0).to(tl.uint8), mask=inside)
        tl.store(partials + rows * num_blocks + pid, tl.sum(tl.abs(v), axis=1), mask=rows < L)

    @triton.jit
    def pack_bits_kernel(codes, packed, width, num_bytes, BITS: tl.constexpr, PER_BYTE: tl.constexpr, BYTES: tl.constexpr):
        """compressors.pack_bits of one row's codes < 2**BITS: code c of the row in bits
        (c % PER_BYTE) * BITS of byte c // PER_BYTE."""
        row = tl.program_id(1).to(tl.int64)
        byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
        slot = tl.arange(0, PER_BYTE)
        column = byte[:, None] * PER_BYTE + slot[None, :]
        code = tl.load(codes + row * width + column, mask=column < width, other=0).to(tl.int32)
        tl.store(packed + row * num_bytes + byte, tl.sum(code << (slot[None, :] * BITS), axis=1).to(tl.uint8), mask=byte < num_bytes)

    @triton.jit
    def means_of_blocks_kernel(partials, first_block, lengths, means, L, num_tensors, num_blocks, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        """means[row, k] = sum of tensor k's partial sums / its length, blocks in order."""
        k = tl.program_id(0)
        first, last = tl.load(first_block + k), tl.load(first_block + k + 1)
        rows = tl.arange(0, ROWS)
        total = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(first, last, CHUNK):
            blocks = start + tl.arange(0, CHUNK)
            inside = (rows[:, None] < L) & (blocks[None, :] < last)
            total += tl.sum(tl.load(partials + rows[:, None] * num_blocks + blocks[None, :], mask=inside, other=0.0), axis=1)
        tl.store(means + rows * num_tensors + k, total / tl.load(lengths + k).to(tl.float32), mask=rows < L)

    @triton.jit
    def _mixing_tile(mixing, rows, L):
        """The `[L, L]` mixing matrix in a tile of ROWS x ROWS, zero outside."""
        return tl.load(mixing + rows[:, None] * L + rows[None, :], mask=(rows[:, None] < L) & (rows[None, :] < L), other=0.0)

    @triton.jit
    def _sign_times_scale(v, scales, k, rows, L, num_tensors, inside):
        scale = tl.load(scales + rows * num_tensors + k, mask=rows < L, other=0.0)[:, None]
        return tl.where(inside, tl.where(v >= 0, scale, -scale), 0.0)

    @triton.jit
    def choco_update_kernel(x, x_hat, s, scales, mixing, gamma, block_tensor, block_column, bases, lengths, L, num_tensors,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Koloskova et al. 2019, Algorithm 1 (the s_i form) with q_i = C(x_i - x_hat_i):
        x_hat_i += q_i; s_i += sum_j A_ij q_j; x_i += gamma (s_i - x_hat_i)."""
        pid = tl.program_id(0)
        k, n, rows, cols, at = _block_of(pid, block_tensor, block_column, bases, lengths, ROWS, BLOCK)
        inside = (rows[:, None] < L) & (cols[None, :] < n)
        xs = tl.load(x + at, mask=inside, other=0.0)
        x_hats = tl.load(x_hat + at, mask=inside, other=0.0)
        q = _sign_times_scale(xs - x_hats, scales, k, rows, L, num_tensors, inside)
        A = _mixing_tile(mixing, rows, L)
        x_hats = x_hats + q
        ss = tl.load(s + at, mask=inside, other=0.0) + tl.dot(A, q, input_precision="ieee")
        tl.store(x_hat + at, x_hats, mask=inside)
        tl.store(s + at, ss, mask=inside)
        tl.store(x + at, xs + gamma * (ss - x_hats), mask=inside)

    @triton.jit
    def deepsqueeze_update_kernel(x, delta, scales, mixing, gamma, block_tensor, block_column, bases, lengths, L, num_tensors,
                                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Tang et al. 2019 with error feedback: v_i = x_i + delta_i, c_i = C(v_i);
        x_i += gamma sum_j A_ij c_j (A_ii = w_ii - 1); delta_i = v_i - c_i."""
        pid = tl.program_id(0)
        k, n, rows, cols, at = _block_of(pid, block_tensor, block_column, bases, lengths, ROWS, BLOCK)
        inside = (rows[:, None] < L) & (cols[None, :] < n)
        xs = tl.load(x + at, mask=inside, other=0.0)
        v = xs + tl.load(delta + at, mask=inside, other=0.0)
        c = _sign_times_scale(v, scales, k, rows, L, num_tensors, inside)
        A = _mixing_tile(mixing, rows, L)
        tl.store(x + at, xs + gamma * tl.dot(A, c, input_precision="ieee"), mask=inside)
        tl.store(delta + at, v - c, mask=inside)

    if INTERPRETED:
        @triton.jit
        def _fmod(x, a):
            return x % a  # the interpreter's float % is numpy's fmod
    else:
        @triton.jit
        def _fmod(x, a):
            return libdevice.fmod(x, a)  # the exact fmod torch.fmod calls on a GPU

    @triton.jit
    def _modulo(x, a):
        """mod(x, a) = fmod(x + sign(x) a/2, a) - sign(x) a/2, as MoniquaGossip.modulo rounds it."""
        a = tl.zeros_like(x) + a
        half = tl.where(x > 0, a, tl.where(x < 0, -a, 0.0)) * 0.5
        return _fmod(x + half, a) - half

    @triton.jit
    def moniqua_codes_kernel(x, noise, codes, inverse_B, inverse_delta, block_tensor, block_column, bases, lengths, columns, L,
                             width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Lu & De Sa 2020, 2-bit Moniqua: code = floor((mod(x / B, 1) + 1/2) / delta + u) in 0..3,
        written at the worker's concatenated position (division as torch does it by a scalar:
        a product with the float reciprocal)."""
        pid = tl.program_id(0)
        k, n, rows, cols, at = _block_of(pid, block_tensor, block_column, bases, lengths, ROWS, BLOCK)
        inside = (rows[:, None] < L) & (cols[None, :] < n)
        position = rows[:, None].to(tl.int64) * width + tl.load(columns + k) + cols[None, :]
        xs = tl.load(x + at, mask=inside, other=0.0)
        u = tl.load(noise + position, mask=inside, other=0.0)
        level = tl.floor((_modulo(xs * inverse_B, 1.0) + 0.5) * inverse_delta + u)
        tl.store(codes + position, tl.minimum(tl.maximum(level, 0.0), 3.0).to(tl.uint8), mask=inside)

    @triton.jit
    def moniqua_update_kernel(x, codes, senders, weights, first_edge, B, delta, gamma, block_tensor, block_column, bases, lengths,
                              columns, L, width, BLOCK: tl.constexpr):
        """x_i += gamma sum_{j in N(i)} w_ij (mod(q_j B - x_i, B) - e_i), q = code delta - 1/2,
        e_i = q_i B - mod(x_i, B); each row i in place (the neighbours' codes, not their x, are read)."""
        pid = tl.program_id(0)
        k = tl.load(block_tensor + pid)
        n = tl.load(lengths + k)
        cols = tl.load(block_column + pid) + tl.arange(0, BLOCK)
        inside = cols < n
        base, column = tl.load(bases + k), tl.load(columns + k)
        for i in range(L):
            at = base + i * n + cols
            xs = tl.load(x + at, mask=inside, other=0.0)
            row = tl.zeros([1], dtype=tl.int64) + i  # 64-bit: (L - 1) * width can pass 2**31
            q_own = tl.load(codes + row * width + column + cols, mask=inside, other=0).to(tl.float32) * delta - 0.5
            error = q_own * B - _modulo(xs, B)
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for h in range(tl.load(first_edge + i), tl.load(first_edge + i + 1)):
                j = tl.load(senders + h)
                q = tl.load(codes + j * width + column + cols, mask=inside, other=0).to(tl.float32) * delta - 0.5
                total += tl.load(weights + h) * (_modulo(q * B - xs, B) - error)
            tl.store(x + at, xs + gamma * total, mask=inside)


    @triton.jit
    def _factors(pool, width, first, count, r, offset, at, inside, E: tl.constexpr):
        """A worker's half-edges first .. first + count - 1, their factor entries at positions `at`
        of one matrix (entry (i, c) at offset + i r + c of a half-edge's row of `pool`), side by
        side: `[len(at), E]`, column e = half-edge first + e // r, column e % r; zero past count r."""
        e = tl.arange(0, E)
        edge = (first + e // r).to(tl.int64)
        used = inside[:, None] & (e[None, :] < count * r)
        return tl.load(pool + edge[None, :] * width + offset + at[:, None] * r + (e % r)[None, :], mask=used, other=0.0)

    @triton.jit
    def factor_products_kernel(x, factors, products, bases, ms, ns, rs, factor_offsets, product_offsets, tile_matrix,
                               tile_row, tile_column, first_edge, factor_width, product_width,
                               TRANSPOSED: tl.constexpr, E: tl.constexpr, KEPT: tl.constexpr, SUMMED: tl.constexpr):
        """Vogels et al. 2020, Algorithm 1, "send X_i^T P_ij" (TRANSPOSED) or "send X_i Q_ij": one
        tile of one matrix of worker program_id(1), times each of its half-edges' factors, summed
        over the matrix's whole other dimension."""
        tile, worker = tl.program_id(0), tl.program_id(1)
        k = tl.load(tile_matrix + tile)
        m, n, r = tl.load(ms + k), tl.load(ns + k), tl.load(rs + k)
        first = tl.load(first_edge + worker)
        count = tl.load(first_edge + worker + 1) - first
        base = tl.load(bases + k) + worker * m * n
        factor_offset, product_offset = tl.load(factor_offsets + k), tl.load(product_offsets + k)
        kept = (tl.load(tile_column + tile) if TRANSPOSED else tl.load(tile_row + tile)) + tl.arange(0, KEPT)
        kept_inside = kept < (n if TRANSPOSED else m)
        summed_length = m if TRANSPOSED else n
        # Products summed entry by entry over the loop and across the tile once at the end (a few
        # factor columns: matrix-multiply units, whose tiles want 16 columns or more, would idle)
        if TRANSPOSED:
            partial = tl.zeros((SUMMED, KEPT, E), dtype=tl.float32)
        else:
            partial = tl.zeros((KEPT, SUMMED, E), dtype=tl.float32)
        for start in range(0, summed_length, SUMMED):
            summed = start + tl.arange(0, SUMMED)
            summed_inside = summed < summed_length
            factor = _factors(factors, factor_width, first, count, r, factor_offset, summed, summed_inside, E)
            if TRANSPOSED:  # X[summed rows, kept columns]^T @ P
                xs = tl.load(x + base + summed[:, None] * n + kept[None, :], mask=summed_inside[:, None] & kept_inside[None, :], other=0.0)
                partial += xs[:, :, None] * factor[:, None, :]
            else:  # X[kept rows, summed columns] @ Q
                xs = tl.load(x + base + kept[:, None] * n + summed[None, :], mask=kept_inside[:, None] & summed_inside[None, :], other=0.0)
                partial += xs[:, :, None] * factor[None, :, :]
        total = tl.sum(partial, axis=0 if TRANSPOSED else 1)
        e = tl.arange(0, E)
        edge = (first + e // r).to(tl.int64)
        tl.store(products + edge[None, :] * product_width + product_offset + kept[:, None] * r + (e % r)[None, :], total,
                 mask=kept_inside[:, None] & (e[None, :] < count * r))

    @triton.jit
    def low_rank_update_kernel(x, p, q, weights, bases, ms, ns, rs, p_offsets, q_offsets, tile_matrix, tile_row, tile_column,
                               first_edge, p_width, q_width, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        """Vogels et al. 2020, Algorithm 1, the update X_i += sum_j (+-gamma w_ij) P_ij Q_ij^T on one
        tile of one matrix of worker program_id(1) (weights[h]: the signed gamma w_ij of half-edge h)."""
        tile, worker = tl.program_id(0), tl.program_id(1)
        k = tl.load(tile_matrix + tile)
        m, n, r = tl.load(ms + k), tl.load(ns + k), tl.load(rs + k)
        first = tl.load(first_edge + worker)
        rows = tl.load(tile_row + tile) + tl.arange(0, ROWS)
        columns = tl.load(tile_column + tile) + tl.arange(0, COLUMNS)
        rows_inside, columns_inside = rows < m, columns < n
        p_at, q_at = p + tl.load(p_offsets + k) + rows * r, q + tl.load(q_offsets + k) + columns * r
        total = tl.zeros((ROWS, COLUMNS), dtype=tl.float32)
        for e in range(0, (tl.load(first_edge + worker + 1) - first) * r):  # each half-edge's columns in turn
            edge, c = first + e // r, e % r
            weighted_p = tl.load(weights + edge) * tl.load(p_at + edge * p_width + c, mask=rows_inside, other=0.0)
            total += weighted_p[:, None] * tl.load(q_at + edge * q_width + c, mask=columns_inside, other=0.0)[None, :]
        at = tl.load(bases + k) + worker * m * n + rows[:, None] * n + columns[None, :]
        inside = rows_inside[:, None] & columns_inside[None, :]
        tl.store(x + at, tl.load(x + at, mask=inside, other=0.0) + total, mask=inside)

    @triton.jit
    def orthogonalize_kernel(factors, offsets, lengths, rs, width, eps, R: tl.constexpr, BLOCK: tl.constexpr):
        """algorithms.orthogonalize_ (Gram-Schmidt, in float32) on the factor of matrix
        program_id(1) in the row of half-edge program_id(0), held in registers."""
        edge, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
        length, r = tl.load(lengths + k), tl.load(rs + k)
        i, c = tl.arange(0, BLOCK), tl.arange(0, R)
        inside = (i[:, None] < length) & (c[None, :] < r)
        at = factors + edge * width + tl.load(offsets + k) + i[:, None] * r + c[None, :]
        columns = tl.load(at, mask=inside, other=0.0)
        for column in tl.static_range(R):
            this = tl.sum(tl.where(c[None, :] == column, columns, 0.0), axis=1)
            this = this / (tl.sqrt(tl.sum(this * this)) + eps)
            projections = tl.sum(this[:, None] * columns, axis=0)
            columns = tl.where(c[None, :] > column, columns - projections[None, :] * this[:, None], columns)
            columns = tl.where(c[None, :] == column, this[:, None], columns)
        tl.store(at, columns, mask=inside)


def _options(num_warps: int = 4) -> dict:
    """Launch options: exact float rounding (no fused multiply-adds the plain torch path does not make)."""
    return dict(enable_fp_fusion=False, num_warps=num_warps)


def _blocks(layout: Layout) -> tuple:
    return layout.block_tensor, layout.block_column, layout.bases, layout.lengths


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`compressors.pack_bits` (which calls it on a GPU) in one kernel: the same bytes."""
    codes = codes.contiguous()  # the kernel reads rows of `width` codes side by side
    rows, width = codes.shape
    num_bytes = -(-width * bits // 8)
    packed = torch.empty((rows, num_bytes), dtype=torch.uint8, device=codes.device)
    pack_bits_kernel[(triton.cdiv(num_bytes, 1024), rows)](codes, packed, width, num_bytes, BITS=bits, PER_BYTE=8 // bits, BYTES=1024)
    return packed


def sign_and_norm(layout: Layout, a: torch.Tensor, b: torch.Tensor, b_sign: int) -> list[torch.Tensor]:
    """`compressors.SignAndNorm().compress` of v = a + b_sign * b (flat buffers): the payload
    [signs packed 8 per byte, per-tensor mean |v|] in the same layout."""
    L = layout.rows
    signs = torch.empty((L, layout.width), dtype=torch.uint8, device=a.device)
    partials = torch.empty((L, layout.num_blocks), dtype=torch.float32, device=a.device)
    signs_and_partial_sums_kernel[(layout.num_blocks,)](
        a, b, b_sign, signs, partials, *_blocks(layout), layout.columns, L, layout.width, layout.num_blocks,
        ROWS=layout.padded_rows, BLOCK=layout.block, **_options())
    scales = torch.empty((L, len(layout.sizes)), dtype=torch.float32, device=a.device)
    means_of_blocks_kernel[(len(layout.sizes),)](partials, layout.first_block, layout.lengths, scales, L,
                                                     len(layout.sizes), layout.num_blocks, ROWS=layout.padded_rows, CHUNK=64)
    return [pack_bits(signs, 1), scales]


def choco_update(layout: Layout, x, x_hat, s, scales, mixing, gamma: float) -> None:
    """Choco's state update in place (flat x, x_hat, s) from the payload's scales and the `[L, L]` mixing matrix."""
    choco_update_kernel[(layout.num_blocks,)](
        x, x_hat, s, scales, mixing.contiguous(), gamma, *_blocks(layout), layout.rows, len(layout.sizes),
        ROWS=layout.padded_rows, BLOCK=layout.block, **_options(num_warps=8))  # three states' tiles: 4 warps spill (H200: 4x slower)


def deepsqueeze_update(layout: Layout, x, delta, scales, mixing, gamma: float) -> None:
    """DeepSqueeze's update of flat x and delta in place from the payload's scales and the `[L, L]` mixing matrix."""
    deepsqueeze_update_kernel[(layout.num_blocks,)](
        x, delta, scales, mixing.contiguous(), gamma, *_blocks(layout), layout.rows, len(layout.sizes),
        ROWS=layout.padded_rows, BLOCK=layout.block, **_options())


def moniqua_codes(layout: Layout, x, noise, B: float, delta: float) -> torch.Tensor:
    """The `[L, width]` uint8 codes of MoniquaGossip.step from flat x and its `[L, width]` noise."""
    codes = torch.empty((layout.rows, layout.width), dtype=torch.uint8, device=x.device)
    reciprocal = lambda value: float(np.float32(1) / np.float32(value))  # torch's x / scalar on a GPU
    moniqua_codes_kernel[(layout.num_blocks,)](
        x, noise, codes, reciprocal(B), reciprocal(delta), *_blocks(layout), layout.columns, layout.rows, layout.width,
        ROWS=layout.padded_rows, BLOCK=layout.block, **_options())
    return codes


def moniqua_update(layout: Layout, x, codes, senders, weights, first_edge, B: float, delta: float, gamma: float) -> None:
    """Moniqua's update of flat x in place: worker i sums over half-edges first_edge[i]..first_edge[i+1]-1
    (plan.HalfEdges.first_edge), each with the codes of worker senders[h] and the weight weights[h]."""
    moniqua_update_kernel[(layout.num_blocks,)](
        x, codes, senders, weights, first_edge, B, delta, gamma, *_blocks(layout), layout.columns, layout.rows,
        layout.width, BLOCK=layout.block, **_options())


def _factor_columns(layout: MatrixLayout, max_degree: int) -> int:
    """Columns E of the `[entries, E]` tiles that hold a worker's half-edges' factors side by side."""
    return 1 << (max_degree * layout.max_rank - 1).bit_length()


def fits(layout: MatrixLayout, max_degree: int) -> bool:
    """Whether the PowerGossip kernels hold this layout's factors and a worker's half-edges."""
    return (max(layout.p_block, layout.q_block) * layout.rank_columns <= MAX_FACTOR_ENTRIES
            and _factor_columns(layout, max_degree) <= MAX_FACTOR_COLUMNS)


def orthogonalize_(layout: MatrixLayout, factors: torch.Tensor, left: bool, eps: float = 1e-8) -> None:
    """algorithms.orthogonalize_ on every matrix's factor in every row of flat P (left) or Q."""
    if left:
        lengths, offsets, width, block = layout.m, layout.p_offset, layout.p_width, layout.p_block
    else:
        lengths, offsets, width, block = layout.n, layout.q_offset, layout.q_width, layout.q_block
    orthogonalize_kernel[(factors.shape[0], layout.num_matrices)](
        factors, offsets, lengths, layout.r, width, eps, R=layout.rank_columns, BLOCK=block, **_options(num_warps=8))


def factor_products(layout: MatrixLayout, x: torch.Tensor, factors: torch.Tensor, first_edge: torch.Tensor,
                    max_degree: int, left: bool) -> torch.Tensor:
    """`[H, q_width]` X_i^T P_h (left: `factors` is flat P) or `[H, p_width]` X_i Q_h for every
    half-edge h of worker i and every matrix, from `x` (in_one_storage of the parameters)."""
    num_workers = first_edge.shape[0] - 1
    p, q = (layout.p_offset, layout.p_width), (layout.q_offset, layout.q_width)
    (factor_offset, factor_width), (product_offset, product_width) = (p, q) if left else (q, p)
    products = torch.empty((factors.shape[0], product_width), dtype=torch.float32, device=factors.device)
    tiles, kept = (layout.column_tiles, layout.COLUMNS) if left else (layout.row_tiles, layout.ROWS)
    columns = _factor_columns(layout, max_degree)
    factor_products_kernel[(tiles[0].shape[0], num_workers)](
        x, factors, products, layout.base, layout.m, layout.n, layout.r, factor_offset, product_offset, *tiles,
        first_edge, factor_width, product_width, TRANSPOSED=left, E=columns, KEPT=kept,
        SUMMED=max(1, layout.ENTRIES // (kept * columns)), **_options())
    return products


def low_rank_update(layout: MatrixLayout, x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, weights: torch.Tensor,
                    first_edge: torch.Tensor) -> None:
    """X_i += sum_h weights[h] P_h Q_h^T over worker i's half-edges, for every matrix, in place in `x`."""
    num_workers = first_edge.shape[0] - 1
    low_rank_update_kernel[(layout.update_tiles[0].shape[0], num_workers)](
        x, p, q, weights, layout.base, layout.m, layout.n, layout.r, layout.p_offset, layout.q_offset, *layout.update_tiles,
        first_edge, layout.p_width, layout.q_width, ROWS=layout.UPDATE[0], COLUMNS=layout.UPDATE[1], **_options())
