"""`import data` from the repository root is `powergossip.data` itself, submodules included (the code lives there)."""
import powergossip

powergossip.alias_root_module(__name__)
