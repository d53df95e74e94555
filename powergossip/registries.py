"""The registries' storage: one dict of methods and one of compressors per process.

They live in this package module, loaded once, so that every copy of algorithms.py and
compressors.py shares them: `import algorithms` from the repository root (as in the
original code) and `powergossip.algorithms` register into the same place.
"""
METHODS: dict = {}  # name -> algorithms.Method
COMPRESSORS: dict = {}  # name -> factory(keep_ratio, rank, qsgd_levels) -> compressors.Compressor


def canonical_name(name: str) -> str:
    """Names are case-free and read `-` and `_` alike: `power_gossip` = `power-gossip`."""
    return name.strip().lower().replace("_", "-")


def lookup(table: dict, aliases: dict, name: str) -> str | None:
    """The key of `name` in `table` (either spelling, aliases included); None if unknown."""
    key = canonical_name(name)
    key = aliases.get(key, key)
    return key if key in table else None
