"""Choco and DeepSqueeze with sign-and-norm, and Moniqua, run a round whose messages stay in the
process as two fused passes (kernels.py) on a GPU. Against the plain torch path, from the same
state, every step sends the same sign bits or codes and the same number of bytes, and the
per-tensor scales and every state agree to float32 rounding. PowerGossip's half-steps run over
all matrices in a few launches: the same bytes, and messages and states equal to float32 rounding.

Runs on a CUDA GPU with Triton; on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set
before the run and Triton importable), which CI has not: there it skips."""
import pytest
import torch

from powergossip import algorithms, compressors, kernels, topologies
from powergossip import comm as comm_module
from powergossip.models import stacked
from tests.test_in_process_mixing import Recorded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernels.available([torch.zeros(1, device=DEVICE)]),
                                   reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")
METHODS = {
    "choco": lambda comm, topology: algorithms.ChocoGossip(comm, topology, compressors.SignAndNorm(), 0.4, seed=5),
    "deepsqueeze": lambda comm, topology: algorithms.DeepSqueezeGossip(comm, topology, compressors.SignAndNorm(), 0.2, seed=5),
    "moniqua": lambda comm, topology: algorithms.MoniquaGossip(comm, topology, theta=1.5, diffusion_rate=0.3, seed=5),
}
# Sizes that are not multiples of 8 or of a block (a tensor's sign bits start mid-byte in a
# worker's row) and one longer than a block.
SHAPES = [(24, 3, 3, 3), (24,), (10,), (7, 5), (40, 90), (1,)]
# (graph, workers, parameters in one buffer): 16 workers fill a tile's rows, 6 leave padded rows;
# the star has degrees 1 to 15; one_peer_hypercube changes every round (Choco takes fixed graphs only).
CASES = [("ring", 16, True), ("ring", 16, False), ("torus", 16, True), ("star", 16, True), ("ring", 6, True),
         ("one_peer_hypercube", 16, True)]


def start(n_workers: int, one_buffer: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    stacks = [0.3 * torch.randn((n_workers,) + shape, generator=generator).to(DEVICE) for shape in SHAPES]  # within Moniqua's theta
    return stacked.in_one_buffer(stacks) if one_buffer else stacks  # as models.stacked.StackedReplicas holds them


def spread(params) -> float:
    return max((x - x.mean(0)).abs().max().item() for x in params)


@needs_kernels
@pytest.mark.parametrize("graph, n_workers, one_buffer", CASES, ids=[f"{g}-{n}-{'one-buffer' if o else 'separate'}" for g, n, o in CASES])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_step_sends_the_same_bits_and_agrees_to_rounding(method, graph, n_workers, one_buffer):
    if method == "choco" and graph == "one_peer_hypercube":
        pytest.skip("Choco takes fixed graphs")
    fused = Recorded(METHODS[method], graph, True, DEVICE, fused_kernels=True, n_workers=n_workers)
    plain = Recorded(METHODS[method], graph, True, DEVICE, fused_kernels=False, n_workers=n_workers)
    x = start(n_workers, one_buffer)
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
    assert fused.algorithm._layout is not None and plain.algorithm._layout is None  # the kernels ran on one side only
    moved = max((a - b).abs().max().item() for a, b in zip(x, start(n_workers, one_buffer)))
    assert moved > 100 * atol  # the steps compared were no no-ops


@needs_kernels
def test_the_layout_keeps_blocks_inside_tensors():
    stacks = start(16, True)
    layout = kernels.Layout(stacks)
    flat, copied = kernels.flat(stacks)
    assert not copied and flat.data_ptr() == stacks[0].data_ptr() and flat.numel() == sum(t.numel() for t in stacks)
    assert kernels.flat([t.clone() for t in stacks])[1]
    tensor, column = layout.block_tensor.cpu(), layout.block_column.cpu()
    for k, shape in enumerate(SHAPES):
        n = torch.Size(shape).numel()
        assert column[tensor == k].tolist() == list(range(0, n, layout.block))


@needs_kernels
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_in_one_kernel_gives_the_same_bytes(bits):
    generator = torch.Generator().manual_seed(bits)
    for width in (1, 7, 1029, 3000):
        codes = torch.randint(0, 2**bits, (5, width), generator=generator, dtype=torch.uint8).to(DEVICE)
        assert torch.equal(kernels.pack_bits(codes, bits), compressors.pack_bits(codes, bits))


def test_states_keep_each_parameters_dtype_and_other_dtypes_take_the_torch_path():
    """One buffer per state only where the stacks share a dtype; the kernels run on float32 only."""
    mixed = [torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.float64)]
    assert [t.dtype for t in stacked.zeros_in_one_buffer(mixed)] == [torch.float32, torch.float64]
    assert [t.dtype for t in stacked.in_one_buffer(mixed)] == [torch.float32, torch.float64]
    same = stacked.in_one_buffer([torch.ones(4, 3), torch.full((4, 2), 2.0)])
    assert not kernels.flat(same)[1] and same[1].tolist() == [[2.0, 2.0]] * 4
    assert not kernels.available([torch.zeros(2, dtype=torch.float64, device=DEVICE)])


# Matrices with rows past one 8-row tile of X Q and columns past one 256-column tile of X^T P
# and of the update, a 1 x 1 and a 3 x 1, and vectors between them (exact gossip beside
# PowerGossip); one buffer for all, as StackedReplicas holds them.
POWER_SHAPES = [(70, 3, 5, 5), (24,), (130, 40), (5, 200), (1, 1), (3, 300), (3, 1), (70, 3, 5, 5), (10,)]
# (graph, workers, rank, iterations, warm start): degrees 2, 4 and 1 to 15; padded rows; a graph
# that changes every round; random matchings, whose edges come back at either parity of their
# power iteration (half-steps on a part of the round's edges).
POWER_CASES = [("ring", 16, 1, 1, True), ("torus", 16, 2, 2, True), ("star", 16, 1, 1, True), ("ring", 6, 3, 2, False),
               ("one_peer_hypercube", 16, 1, 1, True), ("random_matching", 8, 1, 2, True)]


def power_gossip(comm, topology, rank, iterations, warm_start):
    return algorithms.build("power-gossip", comm, topology, rank=rank, num_iterations=iterations, warm_start=warm_start,
                            diffusion_rate=0.7, seed=3)


@needs_kernels
@pytest.mark.parametrize("graph, n_workers, rank, iterations, warm_start", POWER_CASES, ids=[c[0] for c in POWER_CASES])
def test_power_gossip_sends_the_same_bytes_and_agrees_to_rounding(graph, n_workers, rank, iterations, warm_start, monkeypatch):
    fused_half_steps = []
    product = kernels.factor_products
    monkeypatch.setattr(kernels, "factor_products", lambda *args, **kw: fused_half_steps.append(1) or product(*args, **kw))
    make = lambda comm, topology: power_gossip(comm, topology, rank, iterations, warm_start)
    fused = Recorded(make, graph, True, DEVICE, fused_kernels=True, n_workers=n_workers)
    plain = Recorded(make, graph, True, DEVICE, fused_kernels=False, n_workers=n_workers)
    assert not plain.algorithm.compressed.fused_kernels  # the switch on the method reaches the PowerGossip it holds
    generator = torch.Generator().manual_seed(7)
    first = stacked.in_one_buffer([torch.randn((n_workers,) + shape, generator=generator).to(DEVICE) for shape in POWER_SHAPES])
    x = stacked.in_one_buffer(first)  # a copy, in one buffer as the kernels want
    atol = 1e-5 * spread(x)
    for _ in range(5):  # the first step sends nothing (nobody has moved yet)
        plain.algorithm.load_state_dict(fused.algorithm.state_dict())
        y = [t.clone() for t in x]
        sent_before = len(fused.sent)
        fused.algorithm.step(x)
        plain.algorithm.step(y)
        # The fused path sends a half-step's products of every group in one message per half-edge
        mine = [torch.cat([p.reshape(p.shape[0], -1) for p in payloads], dim=1) for payloads in fused.sent[sent_before:]]
        theirs = [torch.cat([p.reshape(p.shape[0], -1) for p in payloads], dim=1) for payloads in plain.sent[sent_before:]]
        assert [p.shape for p in mine] == [p.shape for p in theirs]
        for a, b in zip(mine, theirs):  # sums of up to 200 products of entries in another order
            torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=0)
        for a, b in zip(x, y):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        mine, theirs = fused.algorithm.state_dict()["compressed"], plain.algorithm.state_dict()["compressed"]
        for a, b in zip(mine.get("p", []) + mine.get("q", []), theirs.get("p", []) + theirs.get("q", [])):
            torch.testing.assert_close(a, b, atol=1e-5 * max(b.abs().max().item(), 1.0), rtol=0)
    assert (fused.comm.bytes_sent == plain.comm.bytes_sent).all()
    assert (fused.comm.messages_sent == plain.comm.messages_sent).all()
    assert len(fused_half_steps) >= 4  # the kernels ran on one side (steps 1 to 4 gossip), the torch path on the other
    moved = max((a - b).abs().max().item() for a, b in zip(x, first))
    assert moved > 100 * atol


@needs_kernels
def test_power_gossip_takes_the_torch_path_for_parameters_in_several_storages():
    comm = comm_module.Communicator(6, DEVICE)
    method = power_gossip(comm, topologies.build("ring", 6), 1, 1, True)
    params = [torch.randn(6, 4, 3, device=DEVICE), torch.randn(6, 5, 2, device=DEVICE)]
    for _ in range(3):
        method.step(params)
    assert method.compressed._matrix_layout is None


@needs_kernels
def test_power_gossip_with_no_matrix_to_compress_gossips_the_rest():
    comm = comm_module.Communicator(4, DEVICE)
    ring = topologies.build("ring", 4)
    method = algorithms.OnlyOnLargeParameters(algorithms.PowerGossip(comm, ring), algorithms.SimpleGossip(comm, ring),
                                              min_compression_rate=100.0, rank=1)  # a 3 x 2 matrix: sent whole
    params = stacked.in_one_buffer([torch.randn(4, 3, 2, device=DEVICE), torch.randn(4, 5, device=DEVICE)])
    disagreement = lambda x: (x - x.mean(0)).norm().item()
    before = [disagreement(x) for x in params]
    for _ in range(3):
        method.step(params)
    # Exact gossip on a 4-ring (weights 1/3): every mode but the mean shrinks by 1/3 a step
    for x, start in zip(params, before):
        assert disagreement(x) == pytest.approx(start / 27, rel=1e-4)


def test_one_storage_finds_a_subset_of_one_buffer_and_refuses_separate_tensors():
    stacks = stacked.in_one_buffer([torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, 5, 2)])
    flat, offsets = kernels.in_one_storage([stacks[2], stacks[0]])
    assert offsets == [20, 0] and flat.numel() == 60 and flat.data_ptr() == stacks[0].data_ptr()
    assert kernels.in_one_storage([torch.zeros(4, 3), torch.zeros(4, 2)]) is None
