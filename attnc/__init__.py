"""attnc: declare an attention recurrence, get fused Triton kernels with autograd.

    op = attnc.load("gla")                 # or attnc.compile("my_variant.attn")
    o, final_state = op(q=q, k=k, v=v, g=g, output_final_state=True)
"""
from .dsl.errors import SpecError
from .runtime.compiler import compile, load, shipped_specs  # noqa: A004

__version__ = "0.1.0"
__all__ = ["SpecError", "compile", "load", "shipped_specs", "__version__"]
