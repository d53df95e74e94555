"""When every neighbour is in the process, Choco and DeepSqueeze mix their workers' own
reconstructions (on a GPU through an [L, L] matrix; on the CPU in the order a run across processes
sums them), and Moniqua reads the neighbours' codes from its own, instead of decoding the received
copies. Against the path a run across processes takes (`in_process_mixing = False`) they send the
same bytes and compute the same bits on the CPU (the layout contract, README), and agree up to
float32 rounding on a GPU."""
import pytest
import torch

from powergossip import algorithms
from powergossip import comm as comm_module
from powergossip import compressors
from powergossip import topologies
from tests import algorithm_runs

N, STEPS = 6, 5
COMPRESSORS = {"sign": compressors.SignAndNorm, "top_k": lambda: compressors.TopK(keep_ratio=0.3),
               "qsgd": lambda: compressors.QSGD(levels=4)}
METHODS = {"choco": lambda comm, graph, compressor: algorithms.ChocoGossip(comm, graph, compressor, 0.4, seed=5),
           "deepsqueeze": lambda comm, graph, compressor: algorithms.DeepSqueezeGossip(comm, graph, compressor, 0.2, seed=5)}
# 6 workers: the 2 x 3 torus has coinciding neighbours (one half-edge of weight 2/5), the star irregular degrees
GRAPHS = ["ring", "torus", "star"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


class Recorded:
    """One method on its own Communicator, with a copy of every payload it hands to `exchange` and
    the number of rows of every decompression."""

    def __init__(self, make, graph, in_process_mixing: bool, device: str, fused_kernels: bool = False, n_workers: int = N):
        self.comm = comm_module.Communicator(n_workers, device)
        self.algorithm = make(self.comm, topologies.build(graph, n_workers))
        self.algorithm.in_process_mixing = in_process_mixing
        self.algorithm.fused_kernels = fused_kernels  # tests/test_fused_kernels.py compares those
        self.sent, self.decoded_rows = [], []
        exchange = self.comm.exchange

        def recording_exchange(topology, payloads, per="half_edge"):
            self.sent.append([p.clone() for p in payloads])
            return exchange(topology, payloads, per)

        self.comm.exchange = recording_exchange
        compressor = getattr(self.algorithm, "compressor", None)
        if compressor is not None:
            decompress = compressor.decompress

            def counting_decompress(payload, shapes):
                self.decoded_rows.append(payload[0].shape[0])
                return decompress(payload, shapes)

            compressor.decompress = counting_decompress


def twins(make, graph, device="cpu"):
    return Recorded(make, graph, True, device), Recorded(make, graph, False, device)


def run_both(make, graph):
    """Both paths' runs of STEPS steps from the same start: (fast, exchanged, their parameters)."""
    fast, exchanged = twins(make, graph)
    x, y = start(), start()
    for _ in range(STEPS):
        fast.algorithm.step(x)
        exchanged.algorithm.step(y)
    return fast, exchanged, x, y


def start(device="cpu"):
    return [x.to(device) for x in algorithm_runs.initial_state("choco_sign", N)]


def tolerance(params):
    """float32 rounding of a few steps, relative to how far the workers start apart."""
    return 1e-5 * max((x - x.mean(0)).abs().max().item() for x in params)


def assert_same_bytes(fast, exchanged):
    assert len(fast.sent) == len(exchanged.sent)
    for mine, theirs in zip(fast.sent, exchanged.sent):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert (fast.comm.bytes_sent == exchanged.comm.bytes_sent).all()
    assert (fast.comm.messages_sent == exchanged.comm.messages_sent).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_step_sends_the_same_payload_and_agrees_bit_for_bit_on_the_cpu(method, compressor, graph, device):
    """Both paths take every step from the same state (parameters, method state, random streams):
    the same bits on the CPU, float32 rounding apart on a GPU."""
    make = lambda comm, topology: METHODS[method](comm, topology, COMPRESSORS[compressor]())
    fast, exchanged = twins(make, graph, device)
    x = start(device)
    atol = 0.0 if device == "cpu" else tolerance(x)
    for _ in range(STEPS):
        exchanged.algorithm.load_state_dict(fast.algorithm.state_dict())
        y = [t.clone() for t in x]
        fast.algorithm.step(x)
        exchanged.algorithm.step(y)
        for a, b in zip(x, y):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        for name in fast.algorithm.state_names:
            for a, b in zip(fast.algorithm.state[name], exchanged.algorithm.state[name]):
                torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert_same_bytes(fast, exchanged)
    # One process decodes its own L rows at most; the exchanged path its own and the H received together
    H = fast.comm.half_edges(fast.algorithm.topology).num
    assert all(rows == N for rows in fast.decoded_rows) and exchanged.decoded_rows == [N + H] * STEPS
    if compressor == "sign":  # its own reconstruction needs no decoding at all
        assert fast.decoded_rows == []


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_runs_are_the_same_bits_on_the_cpu(method, compressor, graph):
    fast, exchanged, x, y = run_both(lambda comm, topology: METHODS[method](comm, topology, COMPRESSORS[compressor]()), graph)
    for a, b in zip(x, y):
        assert torch.equal(a, b)
    assert (fast.comm.bytes_sent == exchanged.comm.bytes_sent).all()
    assert (fast.comm.messages_sent == exchanged.comm.messages_sent).all()


@pytest.mark.parametrize("graph", GRAPHS)
def test_moniqua_reads_its_own_codes_bit_for_bit(graph):
    """The codes a worker sends are integers: taking them from the sender's own row changes no bit."""
    fast, exchanged, x, y = run_both(
        lambda comm, topology: algorithms.MoniquaGossip(comm, topology, theta=4.0, diffusion_rate=0.3, seed=5), graph)
    for a, b in zip(x, y):
        assert torch.equal(a, b)
    assert_same_bytes(fast, exchanged)
