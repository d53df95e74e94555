"""The registry, extended: a method registered with a typed config (the README's example) is
checked by its dataclass and built from it; factories without one (a class, functools.partial)
still get the settings their signature names."""
import functools
from dataclasses import dataclass

import pytest

import gossip_run
from powergossip import algorithms, comm as comm_module, errors, methods, topologies
from tests.test_gossip_run import run_main


@dataclass(kw_only=True)
class DampedConfig(algorithms.GossipConfig):
    damping: float = 0.5  # fraction of each round's move that is kept

    def __post_init__(self):
        super().__post_init__()
        errors.require(0 < self.damping <= 1, "damping", f"must be in (0, 1], got {self.damping}")


class DampedGossip(algorithms.SimpleGossip):
    def __init__(self, comm, topology, config: DampedConfig):
        super().__init__(comm, topology, diffusion_rate=config.diffusion_rate * config.damping)


@pytest.fixture
def damped():
    algorithms.register_algorithm("damped-gossip", DampedGossip, needs_tuning=False, config=DampedConfig)
    yield "damped_gossip"
    del methods.METHODS["damped-gossip"]


def final_errors(records):
    return [r["value"] for r in records if r["name"] == "error"]


def test_a_method_with_a_config_runs_as_the_method_it_equals(tmp_path, damped):
    """Damping 0.5 at gamma 1 is D-PSGD at gamma 0.5: the same consensus curve, bit for bit."""
    settings = dict(n_workers=6, matrix_size=5, num_steps=20, topology="ring")
    mine = run_main(tmp_path / "mine", algorithm=damped, **settings)
    dpsgd = run_main(tmp_path / "dpsgd", algorithm="dpsgd", optimizer_diffusion_rate=0.5, **settings)
    assert final_errors(mine) == final_errors(dpsgd)
    assert final_errors(mine)[-1] < 0.1 * final_errors(mine)[0]  # they did agree


def test_the_config_checks_the_settings_and_names_the_setting(damped):
    comm, ring = comm_module.Communicator(4, "cpu"), topologies.build("ring", 4)
    with pytest.raises(errors.SettingError, match=r"damping must be in \(0, 1\], got 2") as caught:
        methods.build("damped-gossip", comm, ring, strict=True, damping=2.0)
    assert caught.value.setting == "damping"
    with pytest.raises(ValueError, match="method damped-gossip takes damping, diffusion_rate; not rank"):
        methods.build("damped-gossip", comm, ring, strict=True, rank=2)
    assert methods.METHODS["damped-gossip"].setting_names() == ["damping", "diffusion_rate"]


def test_a_built_in_setting_error_names_the_users_key(tmp_path):
    with pytest.raises(gossip_run.configuration.ConfigError, match="optimizer_num_iterations must be >= 1, got 0"):
        run_main(tmp_path / "out", algorithm="power_gossip", optimizer_num_iterations=0, num_steps=3)
    assert not (tmp_path / "out").exists()


def test_a_partial_factory_gets_the_settings_its_signature_names(tmp_path):
    algorithms.register_algorithm("half-gamma", functools.partial(algorithms.SimpleGossip, diffusion_rate=0.5),
                                  needs_tuning=False)
    try:
        registration = methods.METHODS["half-gamma"]
        assert registration.config is None  # a partial is not the class: its signature speaks
        settings = dict(n_workers=6, matrix_size=5, num_steps=10, topology="ring")
        got = run_main(tmp_path / "partial", algorithm="half_gamma", **settings)
        want = run_main(tmp_path / "dpsgd", algorithm="dpsgd", optimizer_diffusion_rate=0.5, **settings)
        assert final_errors(got) == final_errors(want)
    finally:
        del methods.METHODS["half-gamma"]


def test_method_is_read_as_each_entrypoints_key():
    import train

    assert train.validated(dict(train._DEFAULTS, method="dpsgd"))["optimizer"] == "dpsgd"
    config = gossip_run.configuration.apply_overrides(gossip_run.DEFAULTS, ["method=moniqua", "optimizer_theta=1.0"])
    assert gossip_run.check(config)["algorithm"] == "moniqua"


class KeywordGossip(algorithms.SimpleGossip):
    """A user's subclass with a keyword constructor: its signature, not SimpleGossip's config, names its settings."""

    def __init__(self, comm, topology, rank=1, diffusion_rate=1.0):
        super().__init__(comm, topology, diffusion_rate=diffusion_rate)
        self.factor_rank = rank


def test_a_subclass_with_a_keyword_constructor_gets_its_signatures_settings():
    algorithms.register_algorithm("keyword-gossip", KeywordGossip, needs_tuning=False)
    try:
        assert methods.METHODS["keyword-gossip"].config is None
        comm, ring = comm_module.Communicator(4, "cpu"), topologies.build("ring", 4)
        assert methods.build("keyword-gossip", comm, ring, rank=4, keep_ratio=0.5).factor_rank == 4
        partial = functools.partial(KeywordGossip, diffusion_rate=0.5)
        algorithms.register_algorithm("keyword-partial", partial, needs_tuning=False)
        assert methods.build("keyword-partial", comm, ring, rank=3).factor_rank == 3
    finally:
        methods.METHODS.pop("keyword-gossip", None)
        methods.METHODS.pop("keyword-partial", None)


def test_a_factory_with_a_config_but_no_graph_needs_is_checked_on_the_graph_before_any_work():
    import train
    from powergossip.methods.compressed import CompressedConfig, with_compressor

    algorithms.register_algorithm("my-choco", with_compressor(algorithms.ChocoGossip), config=CompressedConfig)
    try:
        with pytest.raises(errors.ConfigError, match="ChocoGossip needs"):
            train.validated(dict(train._DEFAULTS, optimizer="my-choco", topology="one_peer_exponential"))
    finally:
        del methods.METHODS["my-choco"]


def test_a_constructor_takes_a_config_or_settings_not_both():
    comm, ring = comm_module.Communicator(4, "cpu"), topologies.build("ring", 4)
    with pytest.raises(TypeError, match="not both"):
        algorithms.PowerGossip(comm, ring, algorithms.PowerGossipConfig(), rank=2)
    with pytest.raises(TypeError, match="diffusion_rate=0.5, not a positional 0.5"):
        algorithms.SimpleGossip(comm, ring, 0.5)


@dataclass(kw_only=True)
class ThetaConfig(algorithms.GossipConfig):
    theta: float  # a bound of the user's own method


class ThetaGossip(algorithms.SimpleGossip):
    config_class = ThetaConfig

    def __init__(self, comm, topology, config: ThetaConfig):
        super().__init__(comm, topology, diffusion_rate=config.diffusion_rate)


def test_gossip_run_hands_theta_to_any_method_that_takes_it(tmp_path):
    algorithms.register_algorithm("theta-gossip", ThetaGossip, needs_tuning=False)
    try:
        records = run_main(tmp_path / "out", algorithm="theta_gossip", optimizer_theta=[1.0, 2.0], n_workers=4,
                           matrix_size=4, num_steps=3, topology="ring")
        assert sorted({r["tags"]["theta"] for r in records if r["name"] == "final_error"}) == [1.0, 2.0]
        with pytest.raises(errors.SettingError, match="theta must be given: the method has no default for it"):
            methods.check("theta-gossip", topologies.build("ring", 4), diffusion_rate=1.0)
    finally:
        del methods.METHODS["theta-gossip"]
