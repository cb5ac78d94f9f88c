"""The chunk plan: which chunk-kernel calls compute a spec, and what feeds them.

For the diagonal family every state is `S_t = diag(e^{g_t}) S_{t-1} diag(e^{gv_t}) +
sum_j x_j y_j^T` and every linear readout is `w^T S`. By linearity a state with several
rank-1 input terms is the sum of one chunk recurrence per term (the initial state rides
on the first), and each linear readout of a state is one call's output. Everything the
calls need (w, x, y, g, gv) is an elementwise expression of the inputs, computed by the
plan's prologue; the readout combinators run in its epilogue.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .analysis import Analysis, LinearReadout, StateForm
from .symbols import l2norm


class NoChunkForm(NotImplementedError):
    """The spec's class has no chunk template (yet)."""


@dataclass(frozen=True)
class ChunkCall:
    """One chunk-kernel invocation: o = w^T S (or S_prev), S driven by outer(x, y)."""
    index: int
    state: str
    term: int                      # which rank-1 input term of the state's B_t
    readout: str | None            # placeholder name this call's output binds, if any
    query: sp.Expr | None          # None: the state has no readout; the output is unused
    key: sp.Expr
    value: sp.Expr
    log_gate: sp.Expr | None
    gate: str                      # "none" | "scalar" | "channel"
    log_gate_v: sp.Expr | None
    exclusive: bool                # reads S_{t-1} (readout before the update)
    takes_initial: bool            # the state's initial state enters through this call
    gives_final: bool              # this call's final state is one term of the state's


@dataclass(frozen=True)
class DiagPlan:
    analysis: Analysis
    calls: tuple[ChunkCall, ...]

    @property
    def spec(self):
        return self.analysis.spec


def plan_diagonal(analysis: Analysis) -> DiagPlan:
    if analysis.family != "diagonal":
        raise NoChunkForm(
            f"spec `{analysis.spec.name}` is class {analysis.cls}: its chunk kernels are not "
            "implemented yet; use op.reference(...) meanwhile"
        )
    calls: list[ChunkCall] = []
    readouts_by_state: dict[str, list[LinearReadout]] = {}
    for r in analysis.readouts:
        for lr in r.linear:
            readouts_by_state.setdefault(lr.state, [])
            if lr not in readouts_by_state[lr.state]:
                readouts_by_state[lr.state].append(lr)
    for st in analysis.states:
        reads: list[LinearReadout | None] = list(readouts_by_state.get(st.name, [])) or [None]
        terms = st.inputs or ()
        if not terms:
            raise NoChunkForm(f"state `{st.name}` has no input term (it only decays)")
        for j, term in enumerate(terms):
            for i, lr in enumerate(reads):
                calls.append(_call(len(calls), st, j, term, lr, first_read=(i == 0)))
    return DiagPlan(analysis, tuple(calls))


def _call(index: int, st: StateForm, j: int, term, lr: LinearReadout | None, first_read: bool):
    if st.cls == "identity":
        gate = "none"
    elif st.gate_per_channel:
        gate = "channel"
    elif st.log_gate is not None:
        gate = "scalar"
    else:
        gate = "none"
    return ChunkCall(
        index=index, state=st.name, term=j,
        readout=lr.placeholder.name if lr else None,
        query=lr.query if lr else None,
        key=term.x, value=term.y,
        log_gate=st.log_gate if gate != "none" else None, gate=gate,
        log_gate_v=st.log_gate_v,
        exclusive=bool(lr and lr.version == "t-1"),
        takes_initial=first_read and j == 0,
        gives_final=first_read,
    )


def uses_l2norm(exprs) -> bool:
    return any(e is not None and e.has(l2norm) for e in exprs)
