"""The registries' storage: one dict of methods and one of compressors per process.

They live in this package module, loaded once, so that every copy of algorithms.py and
compressors.py shares them: `import algorithms` from the repository root (as in the
original code) and `powergossip.algorithms` register into the same place.
"""
METHODS: dict = {}  # name -> algorithms.Method
COMPRESSORS: dict = {}  # name -> factory(keep_ratio, rank, qsgd_levels) -> compressors.Compressor
