"""`import compressors` from the repository root is `powergossip.compressors` itself (the code lives there)."""
import powergossip

powergossip.alias_root_module(__name__)
