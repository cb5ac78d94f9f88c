"""Emit an elementwise `Program` (a plan's prologue or epilogue) as two fused Triton kernels
(templates/elementwise.py.jinja): one forward pass over the tokens computing every
output, one backward pass recomputing the steps in registers and running the reverse
pass of `elementwise.gradient_terms`, the same derivation the PyTorch plan prints.

Tensors at the interface are those of the PyTorch Prologue / Epilogue: fp32 [B, T, H, D]
(D = 1 for per-token scalars), weights [1, 1, H, D], params floats. An output that is an
input unchanged is handed back as that tensor, with no kernel work, and the cotangent of
such an output is added to its input's gradient by the launcher, in PyTorch.

Gradients of tensors broadcast over the tokens (weights): each program (BLOCK_T tokens of
one head) writes the sum of its rows' gradients to a [programs, H, D] buffer and the
launcher sums that over programs. No atomics: the result is deterministic, and the
buffer is small (B * T / BLOCK_T rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .elementwise import Program, Term, gradient_terms
from .reference import L2NORM_EPS
from .templating import environment
from .torch_printer import torch_code
from .triton_printer import Dim, TritonPrinter, dim_of

# names the kernels and launchers use themselves: a param that collides is passed to the
# kernels as param_<name>, a tensor argument is renamed <name>_ in the launchers
_FIXED = {"tl", "triton", "torch", "pid_n", "h", "offs_n", "mask_n", "offs_b", "offs_t",
          "offs_1", "mask_1", "T", "H", "N", "B", "device", "grid", "params", "ctx",
          "tensors", "grads", "BLOCK_T", "L2NORM_EPS", "TILE_ELEMENTS", "n_blocks"}
_PER_DIM = ("offs", "mask", "DIM", "BLOCK")   # kernel names of each dim d: offs_d, ...


@dataclass(frozen=True)
class Arg:
    """A group of kernel parameters and the launcher's code for them."""
    comment: str
    params: tuple[str, ...]
    launch: str


@dataclass
class Kernel:
    name: str
    args: list[Arg] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    dims: list[str] = field(default_factory=list)     # dims whose DIM_/BLOCK_ it takes
    constexpr_flags: list[tuple[str, str]] = field(default_factory=list)  # (flag, launch code)

    @property
    def params(self) -> list[str]:
        return [p for a in self.args for p in a.params]


@dataclass(frozen=True)
class ElementwiseModule:
    spec_name: str
    part: str                  # "prologue" | "epilogue"
    class_name: str            # "Prologue" | "Epilogue"
    inputs: list[str]                    # the launchers' variables of the tensor arguments
    constants: list[tuple[str, str]]     # (param name, kernel variable)
    program_lines: list[str]             # the PyTorch forward, quoted in the docstring
    outputs: list[tuple[str, str, str]]  # (output name, launcher variable, program value)
    # (launcher variable, dim size code, streamed) of stored outputs; streamed ones are
    # allocated in the stream dtype the launcher is handed, the others in fp32
    allocations: list[tuple[str, str, bool]]
    dim_sources: list[tuple[str, str]]   # (dim, the input whose last axis gives its size)
    forward: Kernel
    backward: Kernel | None
    # (buffer, input, final): the gradients the backward kernel writes; final ones (no
    # cotangent handed through to add) are stored in the input's dtype
    gradient_buffers: list[tuple[str, str, bool]]
    # (input, its gradient buffer or "None", cotangents of outputs that are the input)
    gradients: list[tuple[str, str, list[str]]]

    @property
    def grad_args(self) -> list[str]:
        return [f"grad_{name}" for name, _, _ in self.outputs]


def render_elementwise(spec_name: str, part: str, program: Program,
                       dims: dict[str, Dim], streamed: frozenset[str] = frozenset()) -> str:
    """The Triton module of `program`; `dims` gives the dim of each input (None: scalar).
    Outputs named in `streamed` are stored in the stream dtype (bf16 when the inputs are):
    the chunk kernels read q, k and v in it, and outputs are returned in it."""
    module = build_module(spec_name, part, program, dims, streamed)
    return environment().get_template("elementwise.py.jinja").render(
        m=module, eps=repr(L2NORM_EPS))


def build_module(spec_name: str, part: str, program: Program,
                 dims: dict[str, Dim], streamed: frozenset[str] = frozenset()) -> ElementwiseModule:
    dims = dict(dims)
    for step in program.steps:
        dims[step.target.name] = dim_of(step.expr, dims)
    inputs = [x.name for x in program.inputs]
    values = inputs + [s.target.name for s in program.steps]
    # a param is a kernel argument under its own name, unless the kernels use that name
    taken = (_FIXED | {f"{role}_{d}" for d in dims.values() if d for role in _PER_DIM}
             | {f"{role}_{x}" for x in values for role in ("b", "d")})
    constants = [(c.name, f"param_{c.name}" if c.name in taken else c.name)
                 for c in program.constants]
    # the launchers' variables: spec names, unless the launchers use the name themselves
    prefix = f"{spec_name}_{part}"
    reserved = (_FIXED | {part.capitalize(), f"{part}_forward", f"{part}_backward",
                          f"{prefix}_fwd", f"{prefix}_bwd"}
                | {f"DIM_{d}" for d in dims.values() if d})
    var = {x: x + "_" if x in reserved else x for x in inputs}
    kernel_var = dict(constants)

    def names(s: sp.Symbol) -> str:
        return kernel_var.get(s.name, f"b_{s.name}")

    printer = TritonPrinter(names, dims)
    stepped = {s.target.name for s in program.steps}
    used_inputs = [x for x in inputs
                   if any(x in {f.name for f in s.expr.free_symbols} for s in program.steps)]

    # ------------------------------------------------------------------ forward kernel
    fwd = Kernel(f"{prefix}_fwd")
    fwd.args += [_input_arg(x, var[x], dims[x]) for x in used_inputs]
    fwd.body += [_load(x, dims[x]) for x in used_inputs]
    fwd.body += [f"b_{s.target.name} = {printer.code(s.expr)}" for s in program.steps]
    stored: dict[str, str] = {}   # step -> the tensor variable holding it
    stored_streamed: dict[str, bool] = {}
    for name, value in program.outputs:
        value = value.name
        if value in stepped and value not in stored:
            stored[value] = f"out_{name}"
            stored_streamed[value] = name in streamed
            kind = "stream dtype" if name in streamed else "fp32"
            fwd.args.append(Arg(f"output {name}: [B, T, H, {_size(dims[value])}] {kind}",
                                (f"p_out_{name}",), f"out_{name}"))
            fwd.body.append(f"_store_tile(p_out_{name}, offs_n, h, H, {_size(dims[value])}, "
                            f"{_offs(dims[value])}, mask_n, {_mask(dims[value])}, b_{value})")
    outputs = [(name, stored.get(value.name) or var[value.name], value.name)
               for name, value in program.outputs]

    # ------------------------------------------------------------------ backward kernel
    bwd = Kernel(f"{prefix}_bwd")
    bwd.args += [_input_arg(x, var[x], dims[x]) for x in used_inputs]
    bwd.body += [_load(x, dims[x]) for x in used_inputs]
    bwd.body += [f"b_{s.target.name} = {printer.code(s.expr)}" for s in program.steps]
    assigned: set[str] = set()
    passed: dict[str, list[str]] = {x: [] for x in inputs}
    bwd.body.append("# cotangents of the outputs")
    for name, value in program.outputs:
        value = value.name
        if value not in stepped:           # an input handed through: the launcher adds it
            passed[value].append(f"grad_{name}")
            continue
        bwd.args.append(_strided_arg(f"p_grad_{name}", f"s_grad_{name}",
                                     f"cotangent of {name}", f"grad_{name}"))
        load = _tile_load(f"p_grad_{name}", f"s_grad_{name}", dims[value])
        bwd.body.append(f"d_{value} {'+=' if value in assigned else '='} {load}")
        assigned.add(value)
    for step, terms in gradient_terms(program):
        if step.target.name not in assigned or not terms:
            continue  # no cotangent reaches this step
        bwd.body.append(f"# {step.target.name} = {torch_code(step.expr)}")
        for term in terms:
            code = _triton_term(term, printer, dims)
            target = term.target.name
            bwd.body.append(f"d_{target} {'+=' if target in assigned else '='} {code}")
            assigned.add(target)
    computed = [x for x in inputs if x in assigned]
    for x in computed:
        flag = f"SUM_TOKENS_{x}"
        bwd.args.append(Arg(f"gradient of {x}: [B, T, H, {_size(dims[x])}], or per-program "
                            f"sums [programs, H, {_size(dims[x])}] if {flag}",
                            (f"p_d_{x}",), f"d_{x}"))
        bwd.constexpr_flags.append((flag, f"_broadcast({var[x]}, B, T)"))
        bwd.body += [
            f"if {flag}:",
            f"    _store_token_sum(p_d_{x}, pid_n, h, H, {_size(dims[x])}, {_offs(dims[x])}, "
            f"mask_n, {_mask(dims[x])}, d_{x})",
            "else:",
            f"    _store_tile(p_d_{x}, offs_n, h, H, {_size(dims[x])}, {_offs(dims[x])}, "
            f"mask_n, {_mask(dims[x])}, d_{x})",
        ]
    gradients = [(var[x], f"d_{x}" if x in assigned else "None", passed[x]) for x in inputs]

    for kernel in (fwd, bwd):
        kernel.dims = sorted({d for d in (dims[x] for x in used_inputs) if d is not None})
        _check_unique(kernel.name, kernel.params + [v for _, v in constants]
                      + [f for f, _ in kernel.constexpr_flags], _FIXED)
    _check_unique(f"{prefix} launchers", [var[x] for x in inputs] + list(stored.values())
                  + [f"d_{x}" for x in computed] + [f"grad_{n}" for n, _ in program.outputs],
                  reserved)
    dim_sources = []
    for d in sorted({d for d in dims.values() if d is not None}):
        source = next((x for x in used_inputs if dims[x] == d), None)
        if source is not None:
            dim_sources.append((d, var[source]))
    return ElementwiseModule(
        spec_name=spec_name, part=part, class_name=part.capitalize(),
        inputs=[var[x] for x in inputs],
        constants=constants,
        program_lines=[f"{s.target.name} = {torch_code(s.expr, frozenset(c.name for c in program.constants))}"
                       for s in program.steps],
        outputs=outputs,
        allocations=[(name, _size(dims[var]), stored_streamed[var]) for var, name in stored.items()],
        dim_sources=dim_sources,
        forward=fwd,
        backward=bwd if computed else None,
        gradient_buffers=[(f"d_{x}", var[x], not passed[x]) for x in computed],
        gradients=gradients,
    )


def _triton_term(term: Term, printer: TritonPrinter, dims: dict[str, Dim]) -> str:
    """Code of one cotangent term, summed over the dim where the target is a scalar."""
    g = f"d_{term.source.name}"
    x = term.target.name
    if term.rule == "l2norm":
        return f"_l2norm_vjp(b_{x}, b_{term.source.name}, {g}, {_mask(dims[x])})"
    if term.rule == "sum":
        return f"tl.broadcast_to({g}, (BLOCK_T, {_block(dims[x])}))"
    code = g if term.factor == 1 else f"{g} * {printer.factor(term.factor)}"
    spread = dims[term.source.name] or dim_of(term.factor, dims)
    if dims[x] is None and spread is not None:
        return f"_row_sum({code}, mask_{spread})"
    return code


def _size(dim: Dim) -> str:
    return "1" if dim is None else f"DIM_{dim}"


def _block(dim: Dim) -> str:
    return "1" if dim is None else f"BLOCK_{dim}"


def _offs(dim: Dim) -> str:
    return "offs_1" if dim is None else f"offs_{dim}"


def _mask(dim: Dim) -> str:
    return "mask_1" if dim is None else f"mask_{dim}"


def _strided_arg(pointer: str, strides: str, comment: str, tensor: str) -> Arg:
    return Arg(comment, (pointer, *(f"{strides}_{axis}" for axis in "bthd")),
               f"{tensor}, *_strides({tensor}, B, T, H)")


def _input_arg(x: str, var: str, dim: Dim) -> Arg:
    return _strided_arg(f"p_{x}", f"s_{x}", f"input {x}: [B, T, H, {_size(dim)}], "
                        "strides 0 where broadcast", var)


def _tile_load(pointer: str, strides: str, dim: Dim) -> str:
    return (f"_load_tile({pointer}, {strides}_b, {strides}_t, {strides}_h, {strides}_d, "
            f"offs_b, offs_t, h, {_offs(dim)}, mask_n, {_mask(dim)})")


def _load(x: str, dim: Dim) -> str:
    return f"b_{x} = {_tile_load(f'p_{x}', f's_{x}', dim)}"


def _check_unique(where: str, names: list[str], reserved: set[str]) -> None:
    """Spec names reach the generated code behind role prefixes (b_q, p_out_o, d_q) or
    renamed away from the names it uses itself; make sure no two still meet."""
    dupes = {n for n in names if names.count(n) > 1} | (set(names) & reserved)
    if dupes:
        raise ValueError(f"{where}: generated names collide: {sorted(dupes)}")
