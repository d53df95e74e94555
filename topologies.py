"""`import topologies` from the repository root is `powergossip.topologies` itself (the code lives there)."""
import powergossip

powergossip.alias_root_module(__name__)
