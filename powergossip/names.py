"""Every name a user may write for a method, a compressor or a setting, in one table.

Method and compressor names are case-free and read `-` and `_` alike (`power_gossip` is
`power-gossip`). The methods' hyper-parameters are `optimizer_<setting>` keys in both
entrypoints (train.py's original names; a method's config field is `<setting>`); the other
spellings that users, the original consensus code and older results use are read as these.
The word for the choice of method is `optimizer` in train.py and `algorithm` in
gossip_run.py (the original code's keys); `method` is read as either.
"""
from __future__ import annotations

SETTING_PREFIX = "optimizer_"

KEY_ALIASES = {  # older or shorter config keys -> the key both entrypoints know
    "compression_rank": "optimizer_rank", "compression_num_iterations": "optimizer_num_iterations",
    "keep_ratio": "optimizer_keep_ratio", "qsgd_levels": "optimizer_qsgd_levels",
    "diffusion_rate": "optimizer_diffusion_rate", "theta": "optimizer_theta",
    "compressor": "optimizer_compressor", "warm_start": "optimizer_warm_start", "round_weights": "optimizer_round_weights",
    "rank": "optimizer_rank", "num_iterations": "optimizer_num_iterations", "edge_memory": "optimizer_edge_memory",
    "min_compression_rate": "optimizer_min_compression_rate",
    "start_compressing_after_num_steps": "optimizer_start_compressing_after_num_steps",
    "one_step_delay": "optimizer_one_step_delay", "fill_missing": "optimizer_fill_missing",
}
METHOD_KEYS = ("optimizer", "algorithm", "method")  # train.py's, gossip_run.py's, and the word both read

METHOD_ALIASES = {"uncompressed": "dpsgd", "allreduce": "all-reduce", "deep-squeeze": "deepsqueeze"}
COMPRESSOR_ALIASES = {"sign": "sign-and-norm", "topk": "top-k", "randomk": "random-k", "fp": "identity"}

# gossip_run.py's study names (the original consensus code's): a registered method with some
# of its settings fixed. Any other registered method runs under its own name.
PRESETS = {
    "uncompressed": ("dpsgd", {}),
    "power_gossip": ("power-gossip", {}),
    "power_gossip_random": ("power-gossip", {"warm_start": False}),
    "power_gossip_signs": ("power-gossip", {"round_weights": True}),
    "power_gossip_random_signs": ("power-gossip", {"warm_start": False, "round_weights": True}),
    "sign_choco": ("choco", {"compressor": "sign-and-norm"}),
    "topk_choco": ("choco", {"compressor": "top-k"}),
    "svd_choco": ("choco", {"compressor": "svd"}),
    "qsgd_choco": ("choco", {"compressor": "qsgd"}),
    "fp_choco": ("choco", {"compressor": "identity"}),
    "sign_deepsqueeze": ("deepsqueeze", {"compressor": "sign-and-norm"}),
    "moniqua": ("moniqua", {}),
}


def canonical_name(name: str) -> str:
    """A method's or compressor's name as registries key it: lower case, `-` for `_`."""
    return name.strip().lower().replace("_", "-")


def lookup(table: dict, aliases: dict, name: str) -> str | None:
    """The key of `name` in `table` (either spelling, aliases included); None if unknown."""
    key = canonical_name(name)
    key = aliases.get(key, key)
    return key if key in table else None


def preset(name: str) -> tuple[str, dict] | None:
    """(method, fixed settings) of a gossip_run.py study name (either spelling), or None."""
    return _PRESETS_BY_KEY.get(canonical_name(name))


def canonical_key(key: str, defaults: dict) -> str:
    """The key `defaults` knows for `key`: itself, its alias, or the other entrypoint's word
    for the method (train.py's `optimizer` is gossip_run.py's `algorithm`; `method` is both)."""
    if key in defaults:
        return key
    key = KEY_ALIASES.get(key, key)
    if key in METHOD_KEYS:
        return next((k for k in METHOD_KEYS if k in defaults), key)
    return key


def setting_key(setting: str) -> str:
    """The config key of a method's setting (`rank` -> `optimizer_rank`; the run's `seed` is `seed`)."""
    return setting if setting == "seed" else SETTING_PREFIX + setting


def settings_of(config: dict) -> dict:
    """A config's `optimizer_<setting>` keys as the methods' settings, and the run's seed."""
    return {key[len(SETTING_PREFIX):]: value for key, value in config.items()
            if key.startswith(SETTING_PREFIX)} | {"seed": config["seed"]}


_PRESETS_BY_KEY = {canonical_name(name): value for name, value in PRESETS.items()}
