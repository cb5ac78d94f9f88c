"""attnc: declare an attention recurrence, get fused Triton kernels with autograd.

    op = attnc.load("gla")                 # or attnc.compile("my_variant.attn")
    o, final_state = op(q=q, k=k, v=v, g=g, output_final_state=True)
"""
from .runtime.settings import apply_process_settings

apply_process_settings()

from .dsl.errors import SpecError  # noqa: E402
from .runtime.compiler import compile, load, shipped_specs  # noqa: A004

__version__ = "0.1.0"
__all__ = ["SpecError", "compile", "load", "shipped_specs", "__version__"]

# The Python decorator front end (dsl/tracer.py): `@attnc.recurrence def f(...)` -> CompiledOp.
from .dsl.tracer import (  # noqa: E402
    Dim, DimExpr, K, Param, Scalar, State, Traced, V, Vec, Weight, decay, gate, to_spec, trace,
    diag, elu, exp, l2norm, log, logsigmoid, outer, relu, rsqrt, sigmoid, silu, softplus, sqrt,
    tanh,
)
from .dsl.tracer import abs_ as abs, sum_ as sum  # noqa: E402,A004 - the language's names
from .runtime.compiler import recurrence  # noqa: E402

__all__ += [
    "recurrence", "to_spec", "trace", "gate", "decay",
    "Dim", "DimExpr", "K", "V", "Vec", "Scalar", "Param", "Weight", "State", "Traced",
    "exp", "log", "sigmoid", "logsigmoid", "softplus", "tanh", "relu", "elu", "silu", "sqrt",
    "rsqrt", "l2norm", "outer", "diag",
]  # `abs` and `sum` stay out of `import *`, which would shadow the builtins
