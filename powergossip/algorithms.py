"""The methods under the original project's name, `algorithms` (`import algorithms` from the
repository root is this module): the registry and every method class, each of which lives in
its own module of `powergossip.methods`.

    comm = comm_module.Communicator(n_workers)
    topology = topologies.build("ring", n_workers)
    gossip = algorithms.PowerGossip(comm, topology, rank=1, num_iterations=1)
    gossip.step(params)             # params: list of [L, ...] float32 tensors
    comm.bytes_sent                 # per local worker, cumulative
"""
from powergossip.methods import METHODS, Registration, build, check, register_algorithm, registered_name  # noqa: F401
from powergossip.methods.all_reduce import AllReduce  # noqa: F401
from powergossip.methods.base import (COMPRESSOR_STREAM, MONIQUA_STREAM, POWERSGD_STREAM, GossipAlgorithm,  # noqa: F401
                                      GossipConfig, Method, check_layout, edge_seed,
                                      from_worker_slots, matrix_groups, matrix_view, orthogonalize_, sum_into_workers,
                                      to_worker_slots)
from powergossip.methods.choco import ChocoGossip  # noqa: F401
from powergossip.methods.compressed import CompressedConfig, CompressedGossip  # noqa: F401
from powergossip.methods.deepsqueeze import DeepSqueezeGossip  # noqa: F401
from powergossip.methods.dpsgd import SimpleGossip  # noqa: F401
from powergossip.methods.large_parameters import OnlyOnLargeParameters  # noqa: F401
from powergossip.methods.moniqua import MoniquaConfig, MoniquaGossip  # noqa: F401
from powergossip.methods.power_gossip import EdgeRows, PowerGossip, PowerGossipConfig  # noqa: F401
from powergossip.methods.powersgd import PowerSGDConfig, StackedPowerSGD  # noqa: F401
from powergossip.methods.push_sum import PushSum, PushSumConfig  # noqa: F401
from powergossip.methods.relay_sum import RelaySum  # noqa: F401
from powergossip.methods.d2 import D2  # noqa: F401
from powergossip.methods.gradient_tracking import GradientTracking  # noqa: F401
