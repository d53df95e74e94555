"""`import algorithms` from the repository root is `powergossip.algorithms` itself (the code lives there)."""
import powergossip

powergossip.alias_root_module(__name__)
