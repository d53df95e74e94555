"""Choco and DeepSqueeze with sign-and-norm, and Moniqua, run a round whose messages stay in the
process as two fused kernels (kernels.py) on a GPU. Against the plain torch path, from the same
state, every step sends the same sign bits or codes and the same number of bytes, and the
per-tensor scales and every state agree to float32 rounding.

Runs on a CUDA GPU with Triton; on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set
before the run and Triton importable), which CI has not: there it skips."""
import os

import pytest
import torch

from powergossip import algorithms, compressors, kernels
from tests.test_in_process_mixing import Recorded

N = 16  # every row of a column block is one worker: 16 fills a tile
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(torch.zeros(1, device=DEVICE)),
                                reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")
METHODS = {
    "choco": lambda comm, topology: algorithms.ChocoGossip(comm, topology, compressors.SignAndNorm(), 0.4, seed=5),
    "deepsqueeze": lambda comm, topology: algorithms.DeepSqueezeGossip(comm, topology, compressors.SignAndNorm(), 0.2, seed=5),
    "moniqua": lambda comm, topology: algorithms.MoniquaGossip(comm, topology, theta=1.5, diffusion_rate=0.3, seed=5),
}
# Sizes that are not multiples of 8 or of a block (a tensor's sign bits start mid-byte in a
# worker's row) and one longer than a block; 16 workers on a ring, a torus and a star (degrees 1 to 15).
SHAPES = [(24, 3, 3, 3), (24,), (10,), (7, 5), (40, 90), (1,)]
GRAPHS = ["ring", "torus", "star"]


def start(one_buffer: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    stacks = [0.3 * torch.randn((N,) + shape, generator=generator).to(DEVICE) for shape in SHAPES]  # within Moniqua's theta
    if one_buffer:  # as models.stacked.StackedReplicas holds them: the kernels read them in place
        buffered = kernels.zeros_in_one_buffer(stacks)
        torch._foreach_copy_(buffered, stacks)
        return buffered
    return stacks


def spread(params) -> float:
    return max((x - x.mean(0)).abs().max().item() for x in params)



@pytest.mark.parametrize("one_buffer", [True, False], ids=["one-buffer", "separate-tensors"])
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_step_sends_the_same_bits_and_agrees_to_rounding(method, graph, one_buffer):
    fused = Recorded(METHODS[method], graph, True, DEVICE, fused_kernels=True, n_workers=N)
    plain = Recorded(METHODS[method], graph, True, DEVICE, fused_kernels=False, n_workers=N)
    x = start(one_buffer)
    atol = 1e-5 * spread(x)  # float32 rounding of a step's sums, relative to how far the workers start apart
    for _ in range(4):  # each step from the same state: parameters, method state, random streams
        plain.algorithm.load_state_dict(fused.algorithm.state_dict())
        y = [t.clone() for t in x]
        fused.algorithm.step(x)
        plain.algorithm.step(y)
        mine, theirs = fused.sent[-1], plain.sent[-1]
        assert [(p.dtype, p.shape) for p in mine] == [(p.dtype, p.shape) for p in theirs]
        if method == "moniqua" and DEVICE == "cpu":  # CPU torch divides by B, the kernel multiplies by 1/B as CUDA does
            assert (mine[0] != theirs[0]).float().mean() < 1e-3
        else:  # sign bits or codes: bit for bit
            assert torch.equal(mine[0], theirs[0])
        if method != "moniqua":  # per-tensor mean |v|, summed in another order
            torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=0)
        for a, b in zip(x, y):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        for name in getattr(fused.algorithm, "state_names", ()):
            for a, b in zip(fused.algorithm.state[name], plain.algorithm.state[name]):
                torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert (fused.comm.bytes_sent == plain.comm.bytes_sent).all()
    assert (fused.comm.messages_sent == plain.comm.messages_sent).all()
    moved = max((a - b).abs().max().item() for a, b in zip(x, start(one_buffer)))
    assert moved > 100 * atol  # the steps compared were no no-ops


def test_the_layout_keeps_blocks_inside_tensors():
    stacks = start(True)
    layout = kernels.Layout(stacks)
    flat, copied = kernels.flat(stacks)
    assert not copied and flat.data_ptr() == stacks[0].data_ptr() and flat.numel() == sum(t.numel() for t in stacks)
    assert kernels.flat([t.clone() for t in stacks])[1]
    tensor, column = layout.block_tensor.cpu(), layout.block_column.cpu()
    for k, shape in enumerate(SHAPES):
        n = torch.Size(shape).numel()
        assert column[tensor == k].tolist() == list(range(0, n, layout.block))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_in_one_kernel_gives_the_same_bytes(bits):
    generator = torch.Generator().manual_seed(bits)
    for width in (1, 7, 1029, 3000):
        codes = torch.randint(0, 2**bits, (5, width), generator=generator, dtype=torch.uint8).to(DEVICE)
        assert torch.equal(kernels.pack_bits(codes, bits), compressors.pack_bits(codes, bits))
