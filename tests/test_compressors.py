"""Compressors: payloads are exactly what the method defines, and their bytes are the formulas."""
import math

import pytest
import torch

from powergossip import comm as comm_module
from powergossip import compressors
from powergossip import topologies


def stacked(rows, *shape, dtype=torch.float32, seed=0):
    return torch.randn((rows,) + shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomness(rows, seed=0):
    return compressors.WorkerRandom(seed, range(rows), torch.device("cpu"))


def payload_bytes_per_row(payload):
    return sum(p[0].numel() * p.element_size() for p in payload)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rows,n", [(3, 1), (2, 13), (1, 64), (0, 7)])
def test_pack_bits_round_trip(bits, rows, n):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = compressors.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(n * bits / 8))
    assert torch.equal(compressors.unpack_bits(packed, bits, n), codes)


def test_smallest_index_dtype():
    assert compressors.smallest_index_dtype(256) == torch.uint8
    assert compressors.smallest_index_dtype(257) == torch.int16
    assert compressors.smallest_index_dtype(2**15) == torch.int16
    assert compressors.smallest_index_dtype(2**15 + 1) == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identity_round_trip(dtype):
    xs = [stacked(3, 4, 5, dtype=dtype), stacked(3, 7, dtype=dtype, seed=1)]
    c = compressors.Identity()
    payload = c.compress(xs)
    out = c.decompress(payload, [x.shape[1:] for x in xs])
    for x, y in zip(xs, out):
        assert torch.equal(y, x.float())
    assert payload_bytes_per_row(payload) == 4 * (20 + 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_and_norm(dtype):
    xs = [stacked(2, 6, 3, dtype=dtype), stacked(2, 5, dtype=dtype, seed=1)]
    xs[0][0, 0, 0] = 0.0  # sign(0) goes out as +1
    c = compressors.SignAndNorm()
    payload = c.compress(xs)
    out = c.decompress(payload, [x.shape[1:] for x in xs])
    for x, y in zip(xs, out):
        x = x.float()
        scale = x.reshape(2, -1).abs().mean(dim=1).view((-1,) + (1,) * (x.dim() - 1))
        torch.testing.assert_close(y, scale * torch.where(x >= 0, 1.0, -1.0))
    assert payload_bytes_per_row(payload) == math.ceil((18 + 5) / 8) + 4 * 2


def test_top_k_keeps_the_largest_magnitudes_with_small_indices():
    xs = [stacked(2, 10, 10), stacked(2, 300, seed=1), stacked(2, 200, 200, seed=2)]
    c = compressors.TopK(keep_ratio=0.1)
    payload = c.compress(xs)
    assert [p.dtype for p in payload] == [torch.float32, torch.uint8, torch.int16, torch.int32]
    out = c.decompress(payload, [x.shape[1:] for x in xs])
    for x, y in zip(xs, out):
        k = max(1, int(x[0].numel() * 0.1))
        for row in range(2):
            kept = y[row].reshape(-1) != 0
            assert kept.sum() == k
            assert torch.equal(y[row].reshape(-1)[kept], x[row].reshape(-1)[kept])
            assert x[row].reshape(-1)[~kept].abs().max() <= x[row].reshape(-1)[kept].abs().min()
    ks = [10, 30, 4000]
    assert payload_bytes_per_row(payload) == 4 * sum(ks) + 1 * 10 + 2 * 30 + 4 * 4000


def test_top_k_rank_matched_keep_ratio():
    c = compressors.TopK(rank=2)
    m, n = 64, 27
    assert c.num_kept(torch.Size([m, 3, 3, 3])) == int(m * n * (m + n) / (2 * m * n) * 2 / 2)


def test_random_k_sends_true_values_of_k_distinct_entries():
    x = stacked(3, 50)
    c = compressors.RandomK(keep_ratio=0.2)
    y = c.decompress(c.compress([x], randomness(3)), [x.shape[1:]])[0]
    for row in range(3):
        kept = y[row] != 0
        assert kept.sum() == 10 and torch.equal(y[row][kept], x[row][kept])
    other = c.decompress(c.compress([x], randomness(3, seed=1)), [x.shape[1:]])[0]
    assert not torch.equal(other != 0, y != 0)


def test_svd_is_the_best_rank_r_approximation():
    x = stacked(2, 8, 5)
    c = compressors.SVD(rank=2)
    payload = c.compress([x])
    y = c.decompress(payload, [x.shape[1:]])[0]
    u, s, vh = torch.linalg.svd(x)
    torch.testing.assert_close(y, u[:, :, :2] @ torch.diag_embed(s[:, :2]) @ vh[:, :2, :], atol=1e-5, rtol=1e-5)
    assert payload_bytes_per_row(payload) == 4 * (8 + 5) * 2


def test_qsgd_unbiased_without_rescaling_and_contractive_with_it():
    x = stacked(1, 100)
    unbiased = compressors.QSGD(levels=4, rescale=False)
    r = randomness(1)
    draws = torch.stack([unbiased.decompress(unbiased.compress([x], r), [x.shape[1:]])[0] for _ in range(2000)])
    step = x.norm().item() / 4  # one level; a draw's error is at most one step, its std at most half
    torch.testing.assert_close(draws.mean(0), x, atol=5 * 0.5 * step / math.sqrt(2000), rtol=0)
    big = stacked(1, 100, 100)
    scaled = compressors.QSGD(levels=16)
    y = scaled.decompress(scaled.compress([big], r), [big.shape[1:]])[0]
    assert ((y - big).norm() / big.norm()) ** 2 < 1
    payload = scaled.compress([big], r)
    assert payload_bytes_per_row(payload) == math.ceil(10000 / 8) + math.ceil(10000 * 8 / 8) + 4  # signs, 5->8-bit levels, norm


def test_payloads_cross_processes_bit_for_bit():
    """What the wire carries is what decompress needs: decompressing the exchanged payload on
    the other end gives the sender's own reconstruction."""
    n = 4
    comm = comm_module.Communicator(n, "cpu")
    ring = topologies.build("ring", n)
    edges = comm.half_edges(ring)
    xs = [stacked(n, 9, 4), stacked(n, 300, seed=3)]
    for c in [compressors.SignAndNorm(), compressors.TopK(keep_ratio=0.3), compressors.QSGD(levels=3),
              compressors.SVD(rank=1), compressors.Identity(), compressors.RandomK(keep_ratio=0.3)]:
        payload = c.compress(xs, randomness(n))
        own = c.decompress(payload, [x.shape[1:] for x in xs])
        received = c.decompress(comm.exchange(ring, payload, per="worker"), [x.shape[1:] for x in xs])
        for mine, theirs in zip(own, received):
            assert torch.equal(theirs, mine[edges.neighbor])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_own_reconstruction_is_the_decompressed_payload_bit_for_bit(dtype):
    """What a sender holds as C(x) (reconstruct) is what its neighbours decode from the wire;
    sign-and-norm gets it from x's signs, zeros of either sign and all-zero tensors included."""
    xs = [stacked(3, 9, 4, dtype=dtype), stacked(3, 300, dtype=dtype, seed=3), torch.zeros(3, 5, dtype=dtype)]
    xs[0][0, 0, 0], xs[0][1, 0, 0] = 0.0, -0.0
    xs[2][1] = -0.0
    shapes = [x.shape[1:] for x in xs]
    for c in [compressors.SignAndNorm(), compressors.TopK(keep_ratio=0.3), compressors.QSGD(levels=3),
              compressors.SVD(rank=1), compressors.Identity(), compressors.RandomK(keep_ratio=0.3)]:
        payload = c.compress(xs, randomness(3))
        for own, decoded in zip(c.reconstruct(xs, payload), c.decompress(payload, shapes)):
            assert own.dtype == decoded.dtype == torch.float32
            assert torch.equal(own.view(torch.int32), decoded.view(torch.int32)), c  # the bits, signed zeros included


@pytest.mark.parametrize("make,match", [
    (lambda: compressors.TopK(keep_ratio=1.5), r"\(0, 1\]"),
    (lambda: compressors.TopK(keep_ratio=0.0), r"\(0, 1\]"),
    (lambda: compressors.TopK(), "exactly one"),
    (lambda: compressors.SVD(rank=0), "rank must be >= 1"),
    (lambda: compressors.QSGD(levels=0), "levels"),
    (lambda: compressors.build("zip"), "compressor .zip. is unknown"),
])
def test_bad_compressor_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()
