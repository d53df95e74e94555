"""Methods by name: one registry that train.py, gossip_run.py, the drop-in optimizer and the
benchmarks read. A method registers itself in its own module with one line,

    register_algorithm("choco", choco, config=CompressedConfig)

and a user's script does the same for its own method. A method's settings are declared
once, as a typed config (a dataclass that checks them in `__post_init__`): the registry
builds it from the settings a run names, which checks them before any work, and hands it
to the factory, `factory(comm, topology, config)`. A factory registered without a config
gets the settings its signature names as keyword arguments, `factory(comm, topology, **settings)`,
and checks them itself (lambdas and functools.partial work).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from powergossip import names, topologies
from powergossip.errors import SettingError
from powergossip.methods.base import Method, own_config

ACTS_ON = ("parameters", "gradients")


@dataclass(frozen=True)
class Registration:
    """A registry entry: how to build the method and where it runs in a training step."""

    factory: Callable[..., Method]
    acts_on: str = "parameters"  # "parameters": x_t, after the gradient and before the local step;
    # "gradients": the gradients, before the local step takes them (PowerSGD)
    needs_tuning: bool = True  # consensus sweeps its diffusion rate unless one is given
    local_step_first: bool = False  # True: the local step, then the method (all-reduce of parameters)
    config: type | None = None  # the method's settings as a dataclass; None: the factory's signature
    graph_needs: str | None = None  # what the method needs of the graph (methods.base.Method.graph_needs)
    graph_user: str | None = None  # who needs it, as the refusal names it (the Method class's name)
    asynchronous: bool = False  # True: the method runs on events, one pair of workers at a time (powergossip/asynchronous.py)

    def setting_names(self) -> list[str]:
        """The settings the method takes."""
        if self.config is not None:  # its own fields first, then those it inherits (diffusion_rate)
            own = self.config.__dict__.get("__annotations__", {})
            return sorted((field.name for field in dataclasses.fields(self.config)), key=lambda name: name not in own)
        built = _configured_class(self.factory)
        if built is not None:  # a partial of a Method class with a config: its fields, less those the partial fixes
            return [f.name for f in dataclasses.fields(own_config(built)) if f.name not in self.factory.keywords]
        parameters = inspect.signature(self.factory).parameters
        return [p for p in list(parameters)[2:] if parameters[p].kind is not parameters[p].VAR_KEYWORD]

    def _takes_any(self) -> bool:
        return self.config is None and _configured_class(self.factory) is None and \
            any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.factory).parameters.values())

    def settings(self, given: dict, strict: bool = False):
        """The method's settings from `given` (a run hands the whole vocabulary; a setting the
        method does not take is left out): its config, checked, or (no config) the keyword
        arguments for its factory. `strict`: a setting it does not take, or one it needs and
        was not given, is a ValueError (the drop-in optimizer's keyword arguments)."""
        takes = self.setting_names()
        if strict:
            unknown = [s for s in given if s not in takes and not self._takes_any()]
            missing = [s for s in takes if self._required(s) and s not in given]
            if unknown or missing:
                raise ValueError(f"takes {', '.join(takes) or 'no settings'}"
                                 + (f"; not {', '.join(unknown)}" if unknown else "")
                                 + (f"; it needs {', '.join(missing)}" if missing else ""))
        chosen = given if self._takes_any() else {s: value for s, value in given.items() if s in takes}
        missing = [s for s in takes if self._required(s) and s not in chosen]
        if missing:
            raise SettingError(missing[0], "must be given: the method has no default for it")
        return self.config(**chosen) if self.config is not None else chosen

    def _required(self, setting: str) -> bool:
        if self.config is not None:
            field = next(f for f in dataclasses.fields(self.config) if f.name == setting)
            return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        built = _configured_class(self.factory)
        if built is not None:
            return Registration(built, config=own_config(built))._required(setting)
        parameter = inspect.signature(self.factory).parameters[setting]
        return parameter.default is parameter.empty

    def build(self, comm, topology, settings) -> Method:
        """The method from `settings` (what `settings()` returned)."""
        return self.factory(comm, topology, settings) if self.config is not None else self.factory(comm, topology, **settings)


def _configured_class(factory) -> type | None:
    """The Method class a functools.partial builds, when that class takes a config (its
    settings are then the config's fields); else None."""
    target = factory.func if isinstance(factory, functools.partial) else None
    if isinstance(target, type) and issubclass(target, Method) and own_config(target) is not None:
        return target
    return None


METHODS: dict[str, Registration] = {}


def register_algorithm(name: str, factory: Callable[..., Method], acts_on: str = "parameters", needs_tuning: bool = True,
                       local_step_first: bool = False, config: type | None = None, graph_needs: type | None = None,
                       asynchronous: bool | None = None) -> None:
    """Make a method available by `name` in train.py, gossip_run.py, the drop-in optimizer and
    the benchmarks: `register_algorithm("my-gossip", MyGossip)` with
    `MyGossip(comm, topology, diffusion_rate=1.0, ...)`, or with `config=MyConfig` (a dataclass of
    its settings) and `MyGossip(comm, topology, config)`.

    Where it runs in a training step (D-PSGD as Lian et al. 2017 run it, the paper's order):
    the gradient at x_t, the method on x_t, the local step on its result; with
    `local_step_first`, the local step and then the method (all-reduce: x_{t+1} = the
    average of the workers' stepped parameters). A method registered with
    `acts_on="gradients"` gets the gradient stacks instead, before the local step (PowerSGD).
    `graph_needs`, the Method class whose `graph_needs` apply (default: the factory, when it is
    a Method class), lets a run check the graph before any work. `asynchronous` (default: the
    Method class's `asynchronous`): the method has no rounds; its `pair(params, worker, partner)`
    runs at each event of the simulated clock (powergossip/asynchronous.py, AD-PSGD)."""
    if acts_on not in ACTS_ON:
        raise ValueError(f"acts_on={acts_on!r} is not one of {', '.join(ACTS_ON)}")
    if config is not None and not dataclasses.is_dataclass(config):
        raise ValueError(f"config={config!r} must be a dataclass of the method's settings")
    if isinstance(factory, type) and issubclass(factory, Method):  # a Method class: its own config and graph needs
        config = own_config(factory) if config is None else config
        graph_needs = factory if graph_needs is None else graph_needs
        asynchronous = factory.asynchronous if asynchronous is None else asynchronous
    needs, user = (graph_needs.graph_needs, graph_needs.__name__) if graph_needs is not None else (None, None)
    METHODS[names.canonical_name(name)] = Registration(factory, acts_on, needs_tuning, local_step_first, config, needs, user,
                                                       bool(asynchronous))


def registered_name(name: str) -> str:
    """The registry key of `name` (either spelling, aliases included); ValueError names the known ones."""
    key = names.lookup(METHODS, names.METHOD_ALIASES, name)
    if key is None:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return key


def build(name: str, comm, topology, strict: bool = False, **settings) -> Method:
    """The method registered as `name` with `settings` (Registration.settings, then .build)."""
    key = registered_name(name)
    try:
        chosen = METHODS[key].settings(settings, strict)
    except SettingError:
        raise
    except ValueError as problem:
        raise ValueError(f"method {key} {problem}") from None
    return METHODS[key].build(comm, topology, chosen)


class _StandIn:
    """What a method's constructor reads of a Communicator (no local workers, no process
    group), for the checks of a method registered without a config."""

    def __init__(self, n_workers: int):
        self.n_workers, self.local_workers, self.device = n_workers, range(0), torch.device("cpu")


def check(name: str, topology, **settings) -> None:
    """The checks of method `name` before any work; SettingError (or, from a factory without a
    config, its own ValueError) says what is wrong. With a config: the config's checks and the
    graph's. Otherwise (no config, or a factory whose graph needs are not known): the factory is
    run against a stand-in communicator (a constructor that needs more of a communicator than
    the stand-in has is checked when the run builds it)."""
    registration = METHODS[registered_name(name)]
    chosen = registration.settings(settings)
    if registration.config is not None and registration.graph_needs is not None:
        topologies.check_requirement(topology, registration.graph_needs, registration.graph_user)
        return
    try:
        registration.build(_StandIn(topology.n_workers), topology, chosen)
    except AttributeError:
        pass
