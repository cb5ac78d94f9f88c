"""Emit a spec's chunk plan as a readable PyTorch module (templates/plan_torch.py.jinja),
and its elementwise parts (prologue, epilogue) also as fused Triton modules
(codegen/emit_elementwise.py), which the plan uses on the "triton" backend."""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import sympy as sp

from ..dsl.printer import pretty
from .elementwise import Program, backward_lines, build_program, forward_lines
from .chunk_diag import LOG_GATE_FLOOR
from .emit_elementwise import render_elementwise
from .plan import ChunkPlan
from .templating import environment
from .symbols import symbol
from .torch_printer import L2NORM_EPS, torch_code

# names the generated module uses itself; spec names that collide get a trailing _
_RESERVED = {"torch", "F", "chunk_diag", "l2norm", "values", "reads", "ops", "o", "ht",
             "finals", "outputs", "states", "per_token", "L2NORM_EPS", "params", "ctx",
             "tensors", "grads", "unbroadcast", "accumulate", "Prologue", "Epilogue",
             "functools", "load_sibling", "elementwise", "prologue", "epilogue"}


def _py_name(name: str) -> str:
    """A spec name as a Python variable of the generated module: names the module uses
    itself, and names that look like its gradient variables, get a trailing _."""
    if name.startswith("_read"):           # the analysis' linear-readout placeholders
        return name[1:]
    clash = (name in _RESERVED or keyword.iskeyword(name) or name.startswith(("d_", "grad_"))
             or re.fullmatch(r"(t|tc|read)\d+", name))
    return name + "_" if clash else name


@dataclass(frozen=True)
class EmittedProgram:
    name: str
    inputs: list[str]
    constants: list[str]
    forward: list[str]
    backward: list[str]
    outputs: list[tuple[str, str]]
    gradients: list[str]
    program: Program

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    @property
    def output_vars(self) -> list[str]:
        return [var for _, var in self.outputs]

    @property
    def grad_args(self) -> list[str]:
        return [f"grad_{name}" for name, _ in self.outputs]

    @property
    def input_grads(self) -> list[str]:
        return [f"d_{x}" for x in self.inputs]


def _program(name: str, outputs: list[tuple[str, sp.Expr]], tensors: list[str],
             floats: list[str]) -> EmittedProgram:
    used = set().union(*(e.free_symbols for _, e in outputs)) if outputs else set()
    used_names = {s.name for s in used}
    inputs = [symbol(n) for n in tensors if n in used_names]
    constants = [symbol(n) for n in floats if n in used_names]
    program = build_program(outputs, inputs, constants)
    grads = [f"d_{s.name}" for s in inputs] + [f"d_{s.target.name}" for s in program.steps]
    return EmittedProgram(
        name=name, inputs=[s.name for s in inputs], constants=[s.name for s in constants],
        forward=forward_lines(program), backward=backward_lines(program),
        outputs=[(n, v.name) for n, v in program.outputs], gradients=grads, program=program,
    )


@dataclass(frozen=True)
class ElementwiseParts:
    prologue: EmittedProgram
    epilogue: EmittedProgram
    call_vars: list[dict]            # per chunk call: role -> operand name (or None)
    placeholders: list[str]          # the linear readouts the epilogue reads
    dims: dict[str, str | None]      # tensor argument -> its vector dim (None: scalar)
    passed: dict[str, str]           # operand name -> the tensor argument it is as it is
    arguments: dict[str, str]        # an argument's Python name in the programs -> its name
                                     # in the spec (the plan's `values` key): they differ
                                     # where a spec name clashes (see _py_name)
    weights: frozenset[str]          # the spec's weight names

    def value_code(self, var: str) -> str:
        """The plan's code of the argument a program calls `var`."""
        return f'values["{self.arguments[var]}"]'

    def operand_code(self, name: str, fp32: bool = False) -> str:
        """The plan's code of a kernel operand: the argument itself where the operand is an
        input or weight as it is (no prologue output), else the prologue's output. `fp32`
        (gates, beta, key scales): a weight passed as it is is converted (on "triton" the
        op hands weights over in their own dtype, and the fused prologue computed these in
        fp32; a weight is [1, 1, H, D], so the conversion is small)."""
        if name in self.passed:
            argument = self.passed[name]
            return f'values["{argument}"]' + (".float()" if fp32 and argument in self.weights else "")
        return f'ops["{name}"]'


def _floored(log_gate: sp.Expr) -> sp.Expr:
    """A log gate the prologue computes, as the chunk kernels read it: at LOG_GATE_FLOOR
    where it is below (codegen/chunk_diag.py), so that its gradient there is 0. The kernels
    hand a log gate's gradient back as their chunk forms give it: for a token below the
    floor that is what the rounding of terms that cancel leaves, and the derivative of the
    prologue's map (-exp(w) * c: -exp(w) * c itself, -1e6) would scale it up."""
    floor = sp.Float(LOG_GATE_FLOOR)
    return sp.Piecewise((floor, log_gate < floor), (log_gate, True))


def elementwise_parts(plan: ChunkPlan) -> ElementwiseParts:
    """The prologue (inputs -> kernel operands of every chunk call) and the epilogue
    (linear readouts + inputs -> outputs) of a plan, as elementwise programs. An operand
    that is an input or weight as it is (deltanet's q, k, v, beta; mamba2's C, B, x) is
    no prologue output: the plan hands the argument itself to the chunk call, and where
    no operand is computed the plan runs no prologue (an autograd Function per call costs
    host time on every call, forward and backward)."""
    analysis = plan.analysis
    spec = analysis.spec
    rename = {s: symbol(_py_name(s.name)) for s in _all_symbols(plan)}
    tensors = [_py_name(n) for n in [i.name for i in spec.inputs] + [w.name for w in spec.weights]]
    floats = [_py_name(p.name) for p in spec.params]
    arguments = {_py_name(n): n for n in _arg_order(spec)}

    # the kernel operands, named after the state and their role
    operands: list[tuple[str, sp.Expr]] = []   # computed by the prologue
    passed: dict[str, str] = {}
    call_vars = []
    per_state_count: dict[str, int] = {}
    for call in plan.calls:
        n = per_state_count.get(call.state, 0)
        per_state_count[call.state] = n + 1
        prefix = call.state if n == 0 else f"{call.state}{n}"
        names = {}
        for role in ("query", "key", "value", "beta", "log_gate", "log_gate_v", "key_scale"):
            expr = getattr(call, role)
            if (role == "log_gate" and call.gate_input is not None or role == "query" and call.query_input
                    is not None or role == "key" and call.key_input is not None
                    or role in ("log_gate", "key_scale") and call.scalar_inputs is not None):
                expr = None  # the chunk kernels compute it from the raw input(s)
            names[role] = None if expr is None else f"{prefix}_{role}"
            if expr is None:
                continue
            expr = expr.xreplace(rename)
            if isinstance(expr, sp.Symbol) and expr.name in tensors:
                passed[names[role]] = arguments[expr.name]
            else:
                operands.append((names[role], _floored(expr) if role in ("log_gate", "log_gate_v") else expr))
        call_vars.append(names)
    prologue = _program("Prologue", operands, tensors, floats)
    placeholders = sorted({_py_name(lr.placeholder.name) for r in analysis.readouts
                           for lr in r.linear})
    readouts = [(name, combinator.xreplace(rename)) for name, combinator in plan.combinators]
    epilogue = _program("Epilogue", readouts, placeholders + tensors, floats)
    dims = {}
    for name, shape in analysis.shapes.items():
        dims[_py_name(name)] = shape[0] if len(shape) == 1 else None
    return ElementwiseParts(prologue, epilogue, call_vars, placeholders, dims, passed, arguments,
                            frozenset(w.name for w in spec.weights))


def emit_elementwise(plan: ChunkPlan) -> dict[str, str]:
    """The fused Triton modules of the plan's prologue and epilogue, by module name
    (<spec>_prologue, <spec>_epilogue): the plan module loads them from beside itself."""
    parts = elementwise_parts(plan)
    name = plan.spec.name
    # q, k and v operands go to the chunk kernels in the stream dtype (gates and beta stay
    # fp32); every output is returned in it
    operands = frozenset(names[role] for names in parts.call_vars
                         for role in ("query", "key", "value") if names[role])
    outputs = frozenset(output for output, _ in parts.epilogue.program.outputs)
    modules = {f"{name}_epilogue": render_elementwise(name, "epilogue", parts.epilogue.program,
                                                      parts.dims, outputs)}
    if parts.prologue.outputs:  # else every operand is an input as it is: no prologue
        modules[f"{name}_prologue"] = render_elementwise(name, "prologue", parts.prologue.program,
                                                         parts.dims, operands)
    return modules


def _residual_code(call) -> str | None:
    """The code of a residual term's input u: "value" where u is the call's value operand
    itself (mamba2's x), which the plan binds to that name and passes twice; else the input."""
    if call.residual is None:
        return None
    if isinstance(call.value, sp.Symbol) and call.value.name == call.residual:
        return "value"
    return f'values["{call.residual}"]'


def emit_plan(plan: ChunkPlan, version: str) -> str:
    analysis = plan.analysis
    spec = analysis.spec
    parts = elementwise_parts(plan)
    prologue, epilogue, placeholders = parts.prologue, parts.epilogue, parts.placeholders
    call_vars = parts.call_vars

    calls = []
    seen: set = set()
    state_index = {s.name: i for i, s in enumerate(spec.states)}
    for call, names in zip(plan.calls, call_vars):
        def gate_arg(role, kind):
            return _gate_arg(names[role] and parts.operand_code(names[role], fp32=True), kind)

        def operand_arg(role, mapped_input):
            code = f'values["{mapped_input}"]' if mapped_input else parts.operand_code(names[role])
            return f"per_token({code}, shape)"

        key = operand_arg("key", call.key_input)
        py = {
            "key": key,
            "value": f'per_token({parts.operand_code(names["value"])}, shape)',
            "query": (operand_arg("query", call.query_input) if call.query is not None
                      else f"torch.zeros_like({key})"),
            "log_gate": (f'per_token(values["{call.gate_input}"], shape)' if call.gate_input
                         else gate_arg("log_gate", call.gate)),
            "log_gate_v": gate_arg("log_gate_v", "channel"),
            "beta": gate_arg("beta", "scalar"),
            "key_scale": gate_arg("key_scale", "scalar"),
            "initial_state": (f"initial_states[{state_index[call.state]}]"
                              if call.takes_initial else "None"),
        }
        call_fields = {**call.__dict__, "readout": call.readout and _py_name(call.readout),
                       "kernels_check_decays": call.kernels_check_decays,
                       "scale": _scale_code(call.scale),
                       "out_dtype": "dtype" if call.direct else "None",
                       "residual": _residual_code(call),
                       "residual_scale": _scale_code(call.residual_scale)}
        read_op = "+=" if call.readout in seen else "="
        final_op = "+=" if call.state in seen else "="
        seen.update({call.readout, call.state} if call.gives_final else {call.readout})
        kernel_name = call.kernel_name(spec.name, len(plan.calls))
        maps = []  # operands the chunk kernels compute from a raw input as they load it
        for role, what, mapped, expr, u in (
                ("gate", "log gate", call.gate_map(), call.log_gate, call.gate_input),
                ("query", "query", call.query_map(), call.query, call.query_input),
                ("key", "key", call.key_map(), call.key, call.key_input)):
            if mapped is not None:
                maps.append(dict(role=role, what=what, var=f"{kernel_name.upper()}_{role.upper()}_MAP",
                                 triton=mapped[0], triton_grad=mapped[1], torch=mapped[2],
                                 expr=str(expr), input=u))
        scalar_map = None  # a scalar gate the chunk kernels compute from raw tensors
        if call.scalar_inputs is not None:
            code, lam = call.scalar_map(analysis)
            inputs = {i.name: i for i in spec.inputs}
            py["log_gate"] = "None"
            call_fields["key_scale"] = None
            scalar_map = dict(
                var=f"{kernel_name.upper()}_SCALAR_MAP", code=code, torch=lam,
                what=f"log gate {call.log_gate}" + ("" if call.key_scale is None
                                                    else f" and key factor {call.key_scale}"),
                args=[f'per_token(values["{n}"], shape).squeeze(-1)' if n in inputs else f'values["{n}"]'
                      for n in call.scalar_inputs])
        calls.append({**call_fields, "py": py, "read_op": read_op, "final_op": final_op,
                      "kernel_name": kernel_name, "maps": maps, "scalar_map": scalar_map})

    return environment().get_template("plan_torch.py.jinja").render(
        spec_name=spec.name,
        filename=spec.filename,
        version=version,
        spec_text=pretty(spec),
        canonical=analysis.canonical.splitlines(),
        prologue=prologue,
        epilogue=epilogue,
        constants=[(c, parts.value_code(c)) for c in sorted(set(prologue.constants) | set(epilogue.constants))],
        prologue_args=", ".join(parts.value_code(x) for x in prologue.inputs),
        epilogue_args=", ".join(f'reads["{x}"]' if x in placeholders else parts.value_code(x)
                                for x in epilogue.inputs),
        # every output a chunk call's readout as it is: no epilogue Function to run
        readouts_as_outputs=(None if epilogue.program.steps
                             or any(v not in placeholders for _, v in epilogue.outputs)
                             else [v for _, v in epilogue.outputs]),
        calls=calls,
        states=[s.name for s in spec.states],
        l2norm_eps=repr(L2NORM_EPS),
    )


def _scale_code(factor: sp.Expr) -> str:
    """Python code of a readout factor made of params (floats in `values`), weights
    ([1, 1, H, D] tensors in `values`) and numbers."""
    return torch_code(factor.xreplace({s: sp.Symbol(f'values["{s.name}"]') for s in factor.free_symbols}))


def _gate_arg(code: str | None, kind: str) -> str:
    if code is None:
        return "None"
    if kind == "scalar":
        # a view without the D = 1 axis, whose backward is a view too (select's allocates
        # a zero tensor and scatters into it: a pass on the device)
        return f'per_token({code}, shape).squeeze(-1)'
    return f'per_token({code}, shape)'


def _arg_order(spec) -> list[str]:
    return ([i.name for i in spec.inputs] + [w.name for w in spec.weights]
            + [p.name for p in spec.params])


def _all_symbols(plan: ChunkPlan) -> set[sp.Symbol]:
    out: set[sp.Symbol] = set()
    for call in plan.calls:
        for e in (call.query, call.key, call.value, call.beta, call.log_gate, call.log_gate_v):
            if e is not None:
                out |= e.free_symbols
    for r in plan.analysis.readouts:
        out |= r.combinator.free_symbols
    return out
