"""Realistic random arguments for a compiled spec (verification, tests, tuning, benches).

Plain `randn` everywhere would be wrong for some inputs: a bare log gate (`gate a =
exp(alpha)`) must be <= 0 and a delta rule's beta lives in [0, 1]. The analysis says
which inputs play those roles; everything else is standard normal. Never zeros.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F

from ..codegen.analysis import Analysis


def _roles(analysis: Analysis) -> dict[str, str]:
    roles: dict[str, str] = {}
    for st in analysis.states:
        for log in (st.log_gate, st.log_gate_v):
            if isinstance(log, sp.Symbol):
                roles[log.name] = "log_gate"
        if st.delta_beta is not None:
            for s in st.delta_beta.free_symbols:
                roles.setdefault(s.name, "unit")
    return roles


def random_arguments(analysis: Analysis, *, B: int, T: int, H: int, dims: dict[str, int],
                     dtype=torch.float32, device="cpu", heads: dict[str, int] | None = None,
                     generator: torch.Generator | None = None,
                     requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Inputs [B, T, H_i, *dims] and weights [H, *dims] for one call.

    `heads` gives fewer heads for some inputs (GQA/GVA); log gates are logsigmoid of a
    normal draw (mean about -0.8), unit-interval inputs sigmoid of one.
    """
    spec = analysis.spec
    roles = _roles(analysis)
    heads = heads or {}
    out: dict[str, torch.Tensor] = {}

    def draw(shape, name):
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        role = roles.get(name)
        if role == "log_gate":
            x = F.logsigmoid(x + 1.0)
        elif role == "unit":
            x = torch.sigmoid(x)
        x = x.to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad) if requires_grad else x

    for inp in spec.inputs:
        out[inp.name] = draw((B, T, heads.get(inp.name, H), *(dims[d] for d in inp.shape)),
                             inp.name)
    for w in spec.weights:
        out[w.name] = draw((H, *(dims[d] for d in w.shape)), w.name)
    return out
