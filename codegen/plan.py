"""The chunk plan: which chunk-kernel calls compute a spec, and what feeds them.

Delta-class states map onto one delta-rule chunk call per linear readout (key, beta,
decay and value read off the analysis). For the diagonal family every state is `S_t = diag(e^{g_t}) S_{t-1} diag(e^{gv_t}) +
sum_j x_j y_j^T` and every linear readout is `w^T S`. By linearity a state with several
rank-1 input terms is the sum of one chunk recurrence per term (the initial state rides
on the first), and each linear readout of a state is one call's output. Everything the
calls need (w, x, y, g, gv) is an elementwise expression of the inputs, computed by the
plan's prologue; the readout combinators run in its epilogue.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy as sp

from .analysis import FAMILY, Analysis, LinearReadout, StateForm
from .symbols import dot, l2norm, nesting, normalize, vsum


class NoChunkForm(NotImplementedError):
    """The spec's class has no chunk template (yet)."""


# sp.simplify's time grows about 3x with each level of nested functions (mamba2 with its
# delta inside 16 exps took 4 s to plan, 20 about a minute). Deeper expressions are taken
# in the form sympy builds them in: what only simplify would have found (a key's scalar
# factor, a readout's scale) is then missed, and the plan keeps a prologue operand or an
# epilogue instead.
SIMPLIFY_MAX_NESTING = 8


def _simplified(expr: sp.Expr) -> sp.Expr:
    return sp.simplify(expr) if nesting(expr) <= SIMPLIFY_MAX_NESTING else expr


@dataclass(frozen=True)
class ChunkCall:
    """One chunk-kernel invocation: o = w^T S (or S_prev), S driven by outer(x, y).

    kind "diag":  S_t = diag(e^g) S diag(e^gv) + x y^T
    kind "delta": S_t = (I - beta k k^T) D S + beta k v^T with k = key, v = value
    """
    index: int
    kind: str                      # "diag" | "delta"
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
    beta: sp.Expr | None = None    # delta: the step size
    # A readout `c * (q^T S)` with c made of params and numbers, whose value no other
    # readout reads: the kernel multiplies by c and stores the output in the stream dtype
    # itself, so no epilogue pass over it follows (`direct`).
    scale: sp.Expr = sp.Integer(1)
    direct: bool = False
    # ... and a term `c * u` beside it (mamba2's `D * x`): u an input shaped like the output,
    # c made of weights and params. The kernel adds it as it stores the output.
    residual: str | None = None          # u's name
    residual_scale: sp.Expr = sp.Integer(0)  # c
    # diag: a key `u * s`, u an input and s a per-token scalar made of scalar inputs, weights
    # and params (mamba2's B * delta): `key` is u and the kernels multiply by s as they load
    # it, so no pass writes the product. None where the key has no such factor, and with
    # per-channel gates (whose kernels do not take one).
    key_scale: sp.Expr | None = None
    # delta: a query `c * l2norm(u)` / key `l2norm(u)`, u an input
    # and c made of params and numbers: `query` / `key` is u, c joins `scale`, and the
    # kernels normalise u's rows as they load them, so no pass writes l2norm(u)
    l2norm_query: bool = False
    l2norm_key: bool = False
    # diag, per-channel gate: a log gate f(u), f elementwise, u a vector input and nothing
    # else (gla's logsigmoid(g) / 16): the call passes u and f (`gate_map`), the kernels
    # compute f(u) as they load u and multiply the gradient by f'(u), so no pass writes the
    # log gate or reads its gradient. None where the gate is not of that form.
    gate_input: str | None = None
    # diag, no V-side gate: a query / key f(u), f elementwise, u a vector input and
    # nothing else (linear_attn's elu(q) + 1, hgrn2's key 1 - sigmoid(f) beside its gate
    # logsigmoid(f)): the call passes u and f (`query_map` / `key_map`), the kernels compute
    # f(u) as they load u and multiply dq / dk by f'(u) as they store them, so no pass
    # writes f(u) or reads its gradient. None where the operand is an input as it is or not
    # of that form (a key with a key_scale).
    query_input: str | None = None
    key_input: str | None = None
    # diag, scalar gate, no V-side gate: a log gate (and a key_scale beside it) made of
    # per-token scalar inputs and per-head weights only (mamba2's -exp(A_log) softplus(dt +
    # dt_bias) and softplus(dt + dt_bias)), which is not an input as it is: the call passes
    # these raw tensors (the inputs, then the weights), the cumsum kernel computes the gate
    # and the key factor from them and the gate-gradient kernel their gradients
    # (`scalar_map`), so no pass writes either or reads their gradients. None otherwise.
    scalar_inputs: tuple[str, ...] | None = None

    @property
    def kernels_check_decays(self) -> bool:
        """Whether the call's cumsum kernel can check its K-side log gate <= 0 as it loads it
        (a DecayCheck, runtime/kernels.py): a scalar gate, or any delta-rule gate. A diagonal
        per-channel gate is cumulated inside the scores kernel, which does not check."""
        return self.log_gate is not None and (self.kind == "delta" or self.gate == "scalar")

    def kernel_name(self, spec_name: str, n_calls: int) -> str:
        """Generated kernels are named after the spec and the state they compute."""
        return f"{spec_name}_{self.state}" + (f"_{self.index}" if n_calls > 1 else "")

    def gate_map(self) -> tuple[str, str, str] | None:
        """(Triton code of f, Triton code of f', PyTorch code of f), each a function of `x`,
        where the call passes a gate input; else None."""
        return None if self.gate_input is None else _input_map(self.log_gate)

    def query_map(self) -> tuple[str, str, str] | None:
        """As gate_map, for a query the call passes as its input (`query_input`)."""
        return None if self.query_input is None else _input_map(self.query)

    def key_map(self) -> tuple[str, str, str] | None:
        """As gate_map, for a key the call passes as its input (`key_input`)."""
        return None if self.key_input is None else _input_map(self.key)

    def scalar_map(self, analysis: Analysis):
        """(ScalarMapCode, PyTorch code of a lambda of the raw tensors returning (log gate, key
        factor or None)) where the call passes scalar inputs (`scalar_inputs`); else None."""
        if self.scalar_inputs is None:
            return None
        from .chunk_diag import ScalarMapCode
        from .torch_printer import torch_code
        from .triton_printer import TritonPrinter

        tokens = tuple(n for n in self.scalar_inputs if n in _scalar_input_names(analysis))
        heads = tuple(n for n in self.scalar_inputs if n not in tokens)
        symbols = {x.name: x for e in (self.log_gate, self.key_scale) if e is not None for x in e.free_symbols}
        cot_gate, cot_scale = sp.Dummy("cot_gate"), sp.Dummy("cot_scale")
        names = {cot_gate: "cot_gate", cot_scale: "cot_scale"}
        names.update({symbols[n]: ("b_" if n in tokens else "w_") + n for n in self.scalar_inputs})
        triton = TritonPrinter(lambda x: names[x], {})
        grads = []
        for n in self.scalar_inputs:
            x = symbols[n]
            grad = cot_gate * sp.diff(self.log_gate, x)
            if self.key_scale is not None:
                grad += cot_scale * sp.diff(self.key_scale, x)
            grads.append(triton.code(grad))
        code = ScalarMapCode(tokens=tokens, heads=heads, log_gate=triton.code(self.log_gate),
                             key_scale="" if self.key_scale is None else triton.code(self.key_scale),
                             grads=tuple(grads))
        args = {symbols[n]: sp.Symbol(f"x{i}") for i, n in enumerate(self.scalar_inputs)}
        scale = "None" if self.key_scale is None else torch_code(self.key_scale.xreplace(args))
        lam = (f"lambda {', '.join(f'x{i}' for i in range(len(args)))}: "
               f"({torch_code(self.log_gate.xreplace(args))}, {scale})")
        return code, lam


def _input_map(expr: sp.Expr) -> tuple[str, str, str]:
    """(Triton code of f, of f', PyTorch code of f), functions of `x`, for `expr` = f(u)."""
    from .torch_printer import torch_code
    from .triton_printer import TritonPrinter

    (u,) = expr.free_symbols
    x = sp.Symbol("x", real=True)
    f = expr.xreplace({u: x})
    triton = TritonPrinter(lambda s: s.name, {})
    return triton.code(f), triton.code(sp.diff(f, x)), torch_code(f)


@dataclass(frozen=True)
class ChunkPlan:
    analysis: Analysis
    calls: tuple[ChunkCall, ...]
    # each output as the epilogue computes it from the calls' outputs (placeholders) and
    # the inputs: the analysis' combinator, less a factor a call applies (ChunkCall.scale)
    combinators: tuple[tuple[str, sp.Expr], ...] = ()

    @property
    def spec(self):
        return self.analysis.spec


def plan_chunks(analysis: Analysis) -> ChunkPlan:
    """One or more chunk calls per state; raises NoChunkForm for classes without one."""
    blocked = [s for s in analysis.states if FAMILY[s.cls] not in ("diagonal", "delta")]
    if blocked:
        s = blocked[0]
        why = f": {s.reason}" if s.reason else ""
        raise NoChunkForm(f"`{analysis.spec.name}` is class {analysis.cls}: state `{s.name}`{why}")
    _refuse_readouts_without_chunk_form(analysis)
    _refuse_values_that_are_not_real(analysis)
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
        if FAMILY[st.cls] == "delta":
            calls.extend(_delta_calls(len(calls), analysis, st, reads))
            continue
        for j, term in enumerate(terms):
            for i, lr in enumerate(reads):
                calls.append(_call(len(calls), analysis, st, j, term, lr, first_read=(i == 0)))
    _refuse_operands_without_a_dim(analysis, calls)
    calls, combinators = _fold_readout_factors(analysis, calls)
    return ChunkPlan(analysis, tuple(calls), combinators)


def _refuse_operands_without_a_dim(analysis: Analysis, calls: list[ChunkCall]) -> None:
    """A query, key or value that sympy simplified to a constant (`1 - sigmoid(f * 0)` is
    1/2) no longer says which dim it spans, and a gate, beta or key scale made of numbers
    and params (`decay S = 0.5 * S`) no tensor to compute it from: the prologue has nothing
    to size them by."""
    for call in calls:
        for role in ("query", "key", "value"):
            expr = getattr(call, role)
            if expr is not None and not any(len(analysis.shapes.get(s.name, ())) == 1
                                            for s in expr.free_symbols):
                raise NoChunkForm(f"state `{call.state}`: its {role} comes out as `{expr}`, which reads "
                                  "no vector, so its dim is unknown")
        tensors = {i.name for i in analysis.spec.inputs} | {w.name for w in analysis.spec.weights}
        for role in ("beta", "log_gate", "log_gate_v", "key_scale"):
            expr = getattr(call, role)
            if expr is not None and not {s.name for s in expr.free_symbols} & tensors:
                # the prologue makes per-token tensors from inputs and weights only
                raise NoChunkForm(f"state `{call.state}`: its {role.replace('_', ' ')} `{expr}` is made of "
                                  "numbers and params only; the chunk kernels take it per token from "
                                  "an input or a weight (no chunk form for a constant one yet)")


def _refuse_readouts_without_chunk_form(analysis: Analysis) -> None:
    """A readout the analysis could not split into linear readouts, or one that reads no
    state and no per-token value (`(q @ S) - (q @ S)`), has no epilogue to compute it."""
    for r in analysis.readouts:
        if r.reason:
            raise NoChunkForm(f"readout `{r.name}` is not a combination of linear readouts `w @ S`: "
                              f"{r.reason}")
        reads = {s.name for s in r.combinator.free_symbols} & {i.name for i in analysis.spec.inputs}
        if not r.linear and not reads:
            raise NoChunkForm(f"readout `{r.name}` comes out as the constant {r.combinator}: it reads "
                              "no state and no per-token value")


def _refuse_values_that_are_not_real(analysis: Analysis) -> None:
    """sympy takes the log of a negative value (`log(-exp(x))`) as complex: the spec's
    values are NaN there, and no kernel can print `I * pi`."""
    for st in analysis.states:
        parts = [st.log_gate, st.log_gate_v, st.delta_key, st.delta_beta, *(st.dplr or ())]
        parts += [x for term in st.inputs for x in (term.x, term.y)]
        for part in parts:
            if part is not None and _not_real(part):
                raise NoChunkForm(f"state `{st.name}`: `{part}` is not real (a log or a root of a "
                                  "negative value)")
    for r in analysis.readouts:
        for part in (r.combinator, *(lr.query for lr in r.linear)):
            if _not_real(part):
                raise NoChunkForm(f"readout `{r.name}`: `{part}` is not real (a log or a root of a "
                                  "negative value)")


def _not_real(expr: sp.Expr) -> bool:
    return expr.has(sp.I, sp.zoo, sp.nan, sp.oo, -sp.oo)


def _fold_readout_factors(analysis: Analysis, calls: list[ChunkCall]):
    """Move a readout's constant factor and a residual term beside it (`o = scale * (q @ S)
    + c * u`) into the one call that computes it: the kernel scales, adds and stores `o` in
    the stream dtype, and the epilogue hands it through instead of reading and writing it
    again."""
    params = {p.name for p in analysis.spec.params}
    combinators = {r.name: r.combinator for r in analysis.readouts}
    for r in analysis.readouts:
        if len(r.linear) != 1 or len(r.shape) != 1:
            continue
        placeholder = r.linear[0].placeholder
        if not r.combinator.is_polynomial(placeholder):  # nothing to fold, and simplify could
            continue                                      # take minutes (exp(exp(... q @ S)))
        factor = _simplified(sp.diff(r.combinator, placeholder))
        rest = _simplified(r.combinator - factor * placeholder)
        residual = _residual_term(analysis, rest, r.shape) if rest != 0 else None
        writers = [i for i, c in enumerate(calls) if c.readout == placeholder.name]
        shared = any(placeholder in other.combinator.free_symbols
                     for other in analysis.readouts if other.name != r.name)
        if (len(writers) != 1 or shared or factor == 0 or (rest != 0 and residual is None)
                or calls[writers[0]].kind != "diag" and residual is not None
                or calls[writers[0]].log_gate_v is not None
                or {s.name for s in factor.free_symbols} - params
                or factor.atoms(sp.Function) or not factor.is_real):
            continue
        (i,) = writers
        fold = dict(scale=factor * calls[i].scale, direct=True)
        if residual is not None:
            fold.update(residual=residual[0], residual_scale=residual[1])
        calls[i] = dataclasses.replace(calls[i], **fold)
        combinators[r.name] = placeholder
    return calls, tuple(combinators.items())


def _residual_term(analysis: Analysis, term: sp.Expr, shape) -> tuple[str, sp.Expr] | None:
    """(u, c) when `term` is c * u for an input u shaped like the readout (`shape`) and c
    made of params and of weights that are per head or shaped like it; else None."""
    spec = analysis.spec
    inputs = {i.name: i for i in spec.inputs}
    weights = {w.name: w for w in spec.weights}
    params = {p.name for p in spec.params}
    streamed = [s for s in term.free_symbols if s.name in inputs]
    if len(streamed) != 1 or tuple(inputs[streamed[0].name].shape) != tuple(shape):
        return None
    (u,) = streamed
    c = _simplified(term / u)
    if c.has(u) or c == 0 or _simplified(term - c * u) != 0:
        return None
    for s in c.free_symbols:
        if s.name in params:
            continue
        if s.name not in weights or tuple(weights[s.name].shape) not in ((), tuple(shape)):
            return None
    return u.name, c


def _gate(st: StateForm) -> str:
    if st.cls == "identity" or st.log_gate is None or st.log_gate == 0:
        return "none"
    return "channel" if st.gate_per_channel else "scalar"


def _delta_calls(start: int, analysis: Analysis, st: StateForm, reads) -> list[ChunkCall]:
    if len(st.inputs) != 1:
        raise NoChunkForm(f"delta state `{st.name}` has {len(st.inputs)} input terms; the delta "
                          "kernels take one, beta * outer(k, v)")
    (term,) = st.inputs
    # the write must use the same key and step size as the erase: x = beta * k
    ratio = _simplified(term.x / (st.delta_beta * st.delta_key))
    if ratio.free_symbols or ratio == 0:
        raise NoChunkForm(f"delta state `{st.name}` writes outer({term.x}, ...) but erases along "
                          f"{st.delta_key} with beta {st.delta_beta}; the delta kernels need "
                          "the write to be beta * outer(k, v)")
    if any(lr is not None and lr.version == "t-1" for lr in reads):
        raise NoChunkForm(f"a readout of delta state `{st.name}` reads the previous state; "
                          "the delta kernels read after the update")
    gate = _gate(st)
    key, l2norm_key = st.delta_key, False
    if (u := _l2norm_of_input(analysis, key)) is not None:
        key, l2norm_key = u, True
    calls = []
    for i, lr in enumerate(reads):
        query, l2norm_query, scale = lr.query if lr else None, False, sp.Integer(1)
        factored = _scaled_l2norm(analysis, query) if query is not None else None
        if factored is not None:
            (query, scale), l2norm_query = factored, True
        calls.append(ChunkCall(
            index=start + i, kind="delta", state=st.name, term=0,
            readout=lr.placeholder.name if lr else None, query=query,
            key=key, value=normalize(ratio * term.y), beta=st.delta_beta,
            log_gate=st.log_gate if gate != "none" else None, gate=gate, log_gate_v=None,
            exclusive=False, takes_initial=True, gives_final=(i == 0),
            scale=scale, l2norm_query=l2norm_query, l2norm_key=l2norm_key,
        ))
    return calls


def _l2norm_of_input(analysis: Analysis, expr: sp.Expr) -> sp.Symbol | None:
    """u when `expr` is l2norm(u) for a vector input u; else None."""
    vectors = {i.name for i in analysis.spec.inputs if i.shape}
    if isinstance(expr, l2norm) and isinstance(expr.args[0], sp.Symbol) and expr.args[0].name in vectors:
        return expr.args[0]
    return None


def _scaled_l2norm(analysis: Analysis, expr: sp.Expr) -> tuple[sp.Symbol, sp.Expr] | None:
    """(u, c) when `expr` is c * l2norm(u), u a vector input and c made of params and
    numbers; else None."""
    params = {p.name for p in analysis.spec.params}
    norms = [f for f in expr.atoms(l2norm) if _l2norm_of_input(analysis, f) is not None]
    if len(norms) != 1:
        return None
    (norm,) = norms
    c = _simplified(expr / norm)
    if c.has(norm) or c == 0 or {x.name for x in c.free_symbols} - params or c.atoms(sp.Function) \
            or _simplified(expr - c * norm) != 0:
        return None
    return norm.args[0], c


def _key_factor(analysis: Analysis, key: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(u, s) when `key` is u * s for a vector input u and s a per-token scalar: made of
    scalar inputs (at least one), weights and params; else None."""
    spec = analysis.spec
    vectors = {i.name for i in spec.inputs if i.shape}
    scalar_inputs = {i.name for i in spec.inputs if not i.shape}
    scalars = scalar_inputs | {w.name for w in spec.weights if not w.shape} | {p.name for p in spec.params}
    streamed = [x for x in key.free_symbols if x.name in vectors]
    if len(streamed) != 1:
        return None
    (u,) = streamed
    factor = _simplified(key / u)
    names = {x.name for x in factor.free_symbols}
    if factor.has(u) or not names <= scalars or not names & scalar_inputs or _simplified(key - factor * u) != 0:
        return None
    return u, factor


def _mapped_input(analysis: Analysis, expr: sp.Expr | None) -> str | None:
    """u's name when `expr` is f(u) for a vector input u, f elementwise (no reductions)
    and made of numbers (gla's log gate logsigmoid(g) / 16, linear_attn's query elu(q) + 1);
    None when it is u itself (nothing to compute) or anything else."""
    if expr is None:
        return None
    vectors = {i.name for i in analysis.spec.inputs if i.shape}
    symbols = expr.free_symbols
    if len(symbols) != 1:
        return None
    (u,) = symbols
    if u.name not in vectors or expr == u or expr.atoms(dot, vsum, l2norm):
        return None
    return u.name


def _scalar_input_names(analysis: Analysis) -> set[str]:
    return {i.name for i in analysis.spec.inputs if not i.shape}


def _scalar_map_inputs(analysis: Analysis, log_gate: sp.Expr, key_scale: sp.Expr | None) -> tuple[str, ...] | None:
    """The raw tensors of a scalar gate's map (`ChunkCall.scalar_inputs`): the per-token scalar
    inputs and per-head weights the log gate and the key factor are made of, in the spec's
    order; None where they are made of anything else (params, vector inputs) or where
    neither needs computing (each an input as it is, or absent)."""
    spec = analysis.spec
    tokens = [i.name for i in spec.inputs if not i.shape]
    heads = [w.name for w in spec.weights if not w.shape]
    used = {x.name for e in (log_gate, key_scale) if e is not None for x in e.free_symbols}
    if not used or not used <= set(tokens) | set(heads):
        return None
    if all(e is None or isinstance(e, sp.Symbol) and e.name in tokens for e in (log_gate, key_scale)):
        return None
    return tuple(n for n in tokens + heads if n in used)


def _call(index: int, analysis: Analysis, st: StateForm, j: int, term, lr: LinearReadout | None,
          first_read: bool):
    gate = _gate(st)
    factored = (_key_factor(analysis, term.x)
                if gate != "channel" and (st.log_gate_v is None or st.log_gate_v == 0) else None)
    key, key_scale = factored if factored else (term.x, None)
    query = lr.query if lr else None
    # feature maps the kernels apply as they load (and whose gradient they apply as they
    # store dq / dk): not beside a V-side gate, whose kernels the maps do not reach
    maps = st.log_gate_v is None
    scalar_inputs = (_scalar_map_inputs(analysis, st.log_gate, key_scale)
                     if gate == "scalar" and st.log_gate_v is None else None)
    return ChunkCall(
        index=index, kind="diag", state=st.name, term=j,
        readout=lr.placeholder.name if lr else None,
        query=query,
        key=key, value=term.y, key_scale=key_scale,
        query_input=_mapped_input(analysis, query) if maps else None,
        key_input=_mapped_input(analysis, key) if maps and key_scale is None else None,
        log_gate=st.log_gate if gate != "none" else None, gate=gate,
        log_gate_v=st.log_gate_v,
        gate_input=_mapped_input(analysis, st.log_gate) if gate == "channel" else None,
        scalar_inputs=scalar_inputs,
        exclusive=bool(lr and lr.version == "t-1"),
        # every readout of the state sees the initial state (through term 0's recurrence);
        # the final state is summed over the terms of one readout's calls only
        takes_initial=j == 0,
        gives_final=first_read,
    )
