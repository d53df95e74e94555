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
