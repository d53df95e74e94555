"""Arithmetic on stacks of workers, `[L, ...]`, whose every worker's numbers do not depend on
how many workers its process holds: the README's layout contract (one process or many, the
same bits). On the CPU a worker's sums and products are taken worker by worker, in a fixed
order; a batched BLAS call would pick its kernel and summation order by the batch's size, so
that a worker's result would depend on its process's other workers. On other devices one
batched call each (the contract is the CPU's).
"""
from __future__ import annotations

import math

import torch


def sum_into_workers(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`out[l] = sum over half-edges h of weights[l, h] * values[h]` for `weights` `[L, H]`
    (nonzero on worker l's own half-edges only, as a plan's `incoming`) and `values` `[H, ...]`.
    On the CPU, slot by slot (a worker's first half-edge, then its second, ...): each worker's
    sum starts at zero and adds its terms in their fixed order, one product and one addition
    at a time, so a worker gets the same bits in every layout and on every CPU (a BLAS product
    of [L, H] by [H, n] sums in an order that depends on L and on the CPU's kernels, and the
    layouts' numbers would part). A half-edge of weight 0 (one a directed graph does not use)
    is left out there: a NaN or inf it carries does not reach the sum, as it does in the one
    matrix product that other devices run."""
    shape = (weights.shape[0],) + tuple(values.shape[1:])
    if values.device.type != "cpu":
        return (weights.to(values.dtype) @ values.reshape(values.shape[0], math.prod(values.shape[1:]))).reshape(shape)
    worker, edge = weights.nonzero(as_tuple=True)  # row by row, each row's half-edges in order
    degrees = torch.bincount(worker, minlength=weights.shape[0])
    slot = torch.arange(len(edge)) - torch.repeat_interleave(torch.cumsum(degrees, 0) - degrees, degrees)
    out = values.new_zeros(shape)
    for k in range(int(degrees.max()) if len(edge) else 0):
        in_slot = slot == k  # at most one half-edge of each worker
        rows, edges = worker[in_slot], edge[in_slot]
        term = values[edges].mul_(weights[rows, edges].to(values.dtype).view((-1,) + (1,) * (values.dim() - 1)))
        out.index_add_(0, rows, term)
    return out


def _packed(matrix: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides, also along dimensions of size 1: BLAS picks its kernel by
    the strides too (a column with a row's stride is another call), and a worker's slice of
    the process's stack has strides that depend on its neighbours in the stack."""
    return matrix.clone(memory_format=torch.contiguous_format)


def matmul_per_worker(a: torch.Tensor, b: torch.Tensor, widths: list[int] | None = None) -> torch.Tensor:
    """a[l] @ b[l] for every worker l of stacks `[L, ...]` of matrices (or of batches of them).
    On the CPU one product per worker, so that a worker's product does not depend on how many
    workers its process holds: BLAS computes a batch of one matrix (a matrix-vector product at
    rank 1) in another order than a batch of several, and the layouts' numbers would part; with
    `widths`, worker l's product takes only b[l]'s first widths[l] columns (its own half-edges'
    slots: the columns after them are zero), so that it does not depend on its process's other
    workers' degrees either. One batched product on other devices."""
    if a.device.type != "cpu":
        return torch.matmul(a, b)
    widths = [b.shape[-1]] * len(a) if widths is None else widths
    out = a.new_zeros(a.shape[:-1] + b.shape[-1:])
    for out_l, a_l, b_l, width in zip(out, a, b, widths):
        out_l[..., :width] = torch.matmul(_packed(a_l), _packed(b_l[..., :width]))
    return out


def add_matmul_per_worker_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, widths: list[int] | None = None) -> None:
    """out[l] += a[l] @ b[l] for every worker l of `[L, m, n]` stacks, in place (as
    matmul_per_worker: per worker on the CPU, over a[l]'s first widths[l] columns and b[l]'s
    first widths[l] rows when given; one baddbmm_ elsewhere)."""
    if out.device.type != "cpu":
        out.baddbmm_(a, b)
        return
    for l, (out_l, a_l, b_l) in enumerate(zip(out, a, b)):
        width = a_l.shape[-1] if widths is None else widths[l]
        out_l.add_(_packed(a_l[..., :width]) @ _packed(b_l[:width]))


def svd_per_worker(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, V^T) of every worker's matrix of a `[L, m, n]` stack: on the CPU one
    worker at a time (LAPACK's batched path may order a matrix's work by the batch), one
    batched call elsewhere."""
    if matrices.device.type != "cpu" or len(matrices) == 0:
        return torch.linalg.svd(matrices, full_matrices=False)
    u, s, vh = zip(*(torch.linalg.svd(matrix, full_matrices=False) for matrix in matrices))
    return torch.stack(u), torch.stack(s), torch.stack(vh)
