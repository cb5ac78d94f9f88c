"""Emit a spec's chunk plan as a readable PyTorch module (templates/plan_torch.py.jinja)."""
from __future__ import annotations

import keyword
from functools import lru_cache
from pathlib import Path

import jinja2
import sympy as sp

from ..dsl.printer import pretty
from .plan import DiagPlan
from .symbols import symbol
from .torch_printer import L2NORM_EPS, torch_code

TEMPLATES = Path(__file__).parent / "templates"
# names the generated module uses itself; spec names that collide get a trailing _
_RESERVED = {"torch", "F", "chunk_diag", "l2norm", "values", "reads", "ops", "o", "ht",
             "finals", "outputs", "states", "per_token", "L2NORM_EPS"}


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_hashes() -> dict[str, str]:
    """Hash of every template file: part of each cache key."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(TEMPLATES.glob("*.jinja"))}


def _py_name(name: str) -> str:
    return name + "_" if name in _RESERVED or keyword.iskeyword(name) else name


def emit_plan(plan: DiagPlan, version: str) -> str:
    analysis = plan.analysis
    spec = analysis.spec
    rename = {s: symbol(_py_name(s.name)) for s in _all_symbols(plan)}

    # the kernel operands, named after the state and their role
    operands: list[tuple[str, sp.Expr]] = []
    call_vars = []
    per_state_count: dict[str, int] = {}
    for call in plan.calls:
        n = per_state_count.get(call.state, 0)
        per_state_count[call.state] = n + 1
        prefix = call.state if n == 0 else f"{call.state}{n}"
        names = {}
        for role in ("query", "key", "value", "log_gate", "log_gate_v"):
            expr = getattr(call, role)
            if expr is None:
                names[role] = None
                continue
            var = f"{prefix}_{role}"
            operands.append((var, expr.xreplace(rename)))
            names[role] = var
        call_vars.append(names)

    temps, reduced = sp.cse([e for _, e in operands], symbols=sp.numbered_symbols("_t"),
                            optimizations="basic")
    prologue = [(t.name, torch_code(e)) for t, e in temps]
    prologue += [(var, torch_code(e)) for (var, _), e in zip(operands, reduced)]

    calls = []
    seen: set = set()
    state_index = {s.name: i for i, s in enumerate(spec.states)}
    for call, names in zip(plan.calls, call_vars):
        key = f'per_token(ops["{names["key"]}"], shape)'
        py = {
            "key": key,
            "value": f'per_token(ops["{names["value"]}"], shape)',
            "query": (f'per_token(ops["{names["query"]}"], shape)' if names["query"]
                      else f"torch.zeros_like({key})"),
            "log_gate": _gate_arg(names["log_gate"], call.gate),
            "log_gate_v": _gate_arg(names["log_gate_v"], "channel"),
        }
        py["initial_state"] = (f"initial_states[{state_index[call.state]}]"
                               if call.takes_initial else "None")
        read_op = "+=" if call.readout in seen else "="
        final_op = "+=" if call.state in seen else "="
        seen.update({call.readout, call.state} if call.gives_final else {call.readout})
        kernel_name = f"{spec.name}_{call.state}" + (f"_{call.index}" if len(plan.calls) > 1 else "")
        calls.append({**call.__dict__, "py": py, "read_op": read_op, "final_op": final_op,
                      "kernel_name": kernel_name})

    epilogue, epilogue_args = [], set()
    placeholders = {lr.placeholder for r in analysis.readouts for lr in r.linear}
    for r in analysis.readouts:
        expr = r.combinator.xreplace(rename)
        epilogue.append((r.name, torch_code(expr)))
        epilogue_args |= {s.name for s in expr.free_symbols} - {p.name for p in placeholders}

    arg_names = [_py_name(n) for n in _arg_order(spec)]
    used = {s.name for _, e in operands for s in e.free_symbols}
    return environment().get_template("plan_torch.py.jinja").render(
        spec_name=spec.name,
        filename=spec.filename,
        version=version,
        spec_text=pretty(spec),
        canonical=analysis.canonical.splitlines(),
        arg_names=[n for n in arg_names if n in used],
        prologue=prologue,
        calls=calls,
        epilogue=epilogue,
        epilogue_args=[n for n in arg_names if n in epilogue_args],
        states=[s.name for s in spec.states],
        l2norm_eps=repr(L2NORM_EPS),
    )


def _gate_arg(var: str | None, kind: str) -> str:
    if var is None:
        return "None"
    if kind == "scalar":
        return f'per_token(ops["{var}"], shape)[..., 0].contiguous()'
    return f'per_token(ops["{var}"], shape)'


def _arg_order(spec) -> list[str]:
    return ([i.name for i in spec.inputs] + [w.name for w in spec.weights]
            + [p.name for p in spec.params])


def _all_symbols(plan: DiagPlan) -> set[sp.Symbol]:
    out: set[sp.Symbol] = set()
    for call in plan.calls:
        for e in (call.query, call.key, call.value, call.log_gate, call.log_gate_v):
            if e is not None:
                out |= e.free_symbols
    for r in plan.analysis.readouts:
        out |= r.combinator.free_symbols
    return out
