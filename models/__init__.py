"""`import models` from the repository root is `powergossip.models` itself, submodules included (the code lives there)."""
import powergossip

powergossip.alias_root_module(__name__)
