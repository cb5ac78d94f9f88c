"""The fp64 oracle: the spec's recurrence run token by token, straight from the IR.

Nothing here depends on the analysis or on any chunk form; it interprets the statements
exactly as dsl/ir.py describes them, so every faster path is tested against it.

Values are float64 tensors with two leading dims [b, h] ahead of their own shape:
per-token inputs are [b, H, *dims], weights [1, H, *dims], numbers, dims and params
[1, 1]; broadcasting lines them up. A value's rank (0 scalar, 1 vector, 2 matrix) is
its dimension count minus two. `diag(x)` stays a `_Diag` holding the vector `x`, so
`diag(a) @ S` is a row scaling; any other use of it builds the matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Union

import torch
import torch.nn.functional as F

from ..dsl.ir import Binary, Call, Expr, Name, Num, Spec, Unary

if TYPE_CHECKING:  # the runtime builds the Bound; the oracle only reads it
    from ..runtime.binding import Bound

# l2norm(x) = x * rsqrt(sum(x * x) + L2NORM_EPS); the kernels use the same epsilon.
L2NORM_EPS = 1e-6

ELEMENTWISE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "elu": F.elu,
    "silu": F.silu,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
}

_ELEMENTWISE_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "+": torch.add,
    "-": torch.sub,
    "*": torch.mul,
    "/": torch.div,
    "**": torch.pow,
}

_LEAD = 2  # the [b, h] dims in front of every value


@dataclass(frozen=True)
class _Diag:
    """The diagonal matrix diag(vector); `vector` is [b, h, n]."""

    vector: torch.Tensor

    def matrix(self) -> torch.Tensor:
        return torch.diag_embed(self.vector)


Value = Union[torch.Tensor, _Diag]


def reference(
    spec: Spec, bound: "Bound", *, output_final_state: bool = False
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Run `spec` on `bound` in float64, one token at a time.

    Returns (outputs, final_states): outputs in `spec.outputs` order, each
    [B, T, H, *shape]; final states in `spec.states` order, each [N, H, *shape], or None
    unless `output_final_state`.
    """
    H = bound.H
    # GQA/GVA: head h of an input with fewer heads H_i is head h // (H // H_i)
    inputs = {n: x.to(torch.float64).repeat_interleave(H // x.shape[2], dim=2)
              for n, x in bound.inputs.items()}
    constants: dict[str, Value] = {n: w.to(torch.float64).unsqueeze(0) for n, w in bound.weights.items()}
    for name, number in {**bound.dims, **bound.params}.items():
        constants[name] = _number(number, bound.device)
    initial = bound.initial_states or (None,) * len(spec.states)
    initial = tuple(None if s is None else s.to(torch.float64) for s in initial)

    if bound.cu_seqlens is None:
        outputs, finals = _run_sequences(spec, inputs, constants, initial, bound.dims)
    else:
        bounds = bound.cu_seqlens.tolist()
        pieces = []
        for index, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
            piece_inputs = {n: x[:, bos:eos] for n, x in inputs.items()}
            piece_initial = tuple(None if s is None else s[index : index + 1] for s in initial)
            pieces.append(_run_sequences(spec, piece_inputs, constants, piece_initial, bound.dims))
        outputs = [torch.cat(parts, dim=1) for parts in zip(*(p[0] for p in pieces))]
        finals = [torch.cat(parts, dim=0) for parts in zip(*(p[1] for p in pieces))]
    return tuple(outputs), (tuple(finals) if output_final_state else None)


def _number(value: float, device: torch.device) -> torch.Tensor:
    return torch.full((1, 1), float(value), dtype=torch.float64, device=device)


def _run_sequences(
    spec: Spec,
    inputs: Mapping[str, torch.Tensor],
    constants: Mapping[str, Value],
    initial: tuple[torch.Tensor | None, ...],
    dims: Mapping[str, int],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The recurrence over a batch of equally long sequences: inputs [b, L, H, *dims]."""
    first = next(iter(inputs.values()))
    batch, length, H = first.shape[:3]
    lead = (batch, H)
    state_shapes = {s.name: (*lead, *(dims[d] for d in s.shape)) for s in spec.states}
    states: dict[str, torch.Tensor] = {}
    for state, start in zip(spec.states, initial):
        shape = state_shapes[state.name]
        states[state.name] = (
            torch.zeros(shape, dtype=torch.float64, device=first.device) if start is None else start.clone()
        )
    literals = _Literals(first.device)
    outputs: dict[str, list[torch.Tensor]] = {o: [] for o in spec.outputs}

    for t in range(length):
        env: dict[str, Value] = {**constants, **{n: x[:, t] for n, x in inputs.items()}, **states}
        step_outputs: dict[str, torch.Tensor] = {}
        for statement in spec.statements:
            value = _evaluate(statement.expr, env, literals)
            if statement.kind in ("decay", "update"):
                value = _fit(statement.target, value, state_shapes[statement.target], statement.kind)
                states[statement.target] = value
            elif statement.kind == "readout":
                value = _dense(value)
                step_outputs[statement.target] = value.expand(*lead, *value.shape[_LEAD:])
            env[statement.target] = value
        for name, values in outputs.items():
            values.append(step_outputs[name])

    stacked = [torch.stack(outputs[o], dim=1) for o in spec.outputs]
    return stacked, [states[s.name].contiguous() for s in spec.states]


def _fit(target: str, value: Value, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """The new value of a state, broadcast over [b, h] (and from a scalar, if it is one)."""
    value = _dense(value)
    state_rank = len(shape) - _LEAD
    if _rank(value) == 0:
        value = _lift(value, state_rank)
    if _rank(value) == state_rank:
        try:
            return value.expand(shape)
        except RuntimeError:
            pass
    raise ValueError(
        f"{kind} {target}: the new value has shape {list(value.shape[_LEAD:])}, "
        f"which does not fit state {target} of shape {list(shape[_LEAD:])}"
    )


# ---------------------------------------------------------------- expressions
class _Literals:
    """One [1, 1] tensor per number in the spec, made once per run, not once per token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensors: dict[float, torch.Tensor] = {}

    def __call__(self, value: float) -> torch.Tensor:
        if value not in self.tensors:
            self.tensors[value] = _number(value, self.device)
        return self.tensors[value]


def _evaluate(expr: Expr, env: Mapping[str, Value], literals: _Literals) -> Value:
    if isinstance(expr, Num):
        return literals(float(expr.value))
    if isinstance(expr, Name):
        if expr.id not in env:
            raise ValueError(f"`{expr.id}` is not defined at this point of the step")
        return env[expr.id]
    if isinstance(expr, Unary):
        operand = _evaluate(expr.operand, env, literals)
        return _Diag(-operand.vector) if isinstance(operand, _Diag) else -operand
    if isinstance(expr, Binary):
        left = _evaluate(expr.left, env, literals)
        right = _evaluate(expr.right, env, literals)
        if expr.op == "@":
            return _matmul(left, right)
        return _elementwise(expr.op, left, right)
    if isinstance(expr, Call):
        args = [_evaluate(a, env, literals) for a in expr.args]
        return _call(expr.func, args)
    raise ValueError(f"cannot evaluate {type(expr).__name__}")


def _rank(value: Value) -> int:
    return 2 if isinstance(value, _Diag) else value.dim() - _LEAD


def _dense(value: Value) -> torch.Tensor:
    return value.matrix() if isinstance(value, _Diag) else value


def _lift(scalar: torch.Tensor, rank: int) -> torch.Tensor:
    """A scalar [b, h] shaped to broadcast against a value of `rank`."""
    return scalar.reshape(*scalar.shape, *(1,) * rank)


def _elementwise(op: str, left: Value, right: Value) -> Value:
    # scaling a diagonal keeps it diagonal; everything else sees the full matrix
    if op in ("*", "/") and isinstance(left, _Diag) and _rank(right) == 0:
        return _Diag(_ELEMENTWISE_OPS[op](left.vector, _lift(right, 1)))
    if op == "*" and isinstance(right, _Diag) and _rank(left) == 0:
        return _Diag(_lift(left, 1) * right.vector)
    left, right = _dense(left), _dense(right)
    left_rank, right_rank = _rank(left), _rank(right)
    if left_rank == 0:
        left = _lift(left, right_rank)
    elif right_rank == 0:
        right = _lift(right, left_rank)
    elif left_rank != right_rank:
        raise ValueError(
            f"`{op}` between a rank-{left_rank} and a rank-{right_rank} value: only scalars broadcast"
        )
    return _ELEMENTWISE_OPS[op](left, right)


def _matmul(left: Value, right: Value) -> Value:
    left_rank, right_rank = _rank(left), _rank(right)
    if left_rank == 0 or right_rank == 0:
        raise ValueError("`@` needs vectors or matrices on both sides, got a scalar")
    if isinstance(left, _Diag) and isinstance(right, _Diag):
        return _Diag(left.vector * right.vector)
    if isinstance(left, _Diag):  # diag(a) @ x scales the rows of x
        return left.vector * right if right_rank == 1 else left.vector.unsqueeze(-1) * right
    if isinstance(right, _Diag):  # x @ diag(b) scales the columns of x
        return left * right.vector if left_rank == 1 else left * right.vector.unsqueeze(-2)
    if left_rank == 1 and right_rank == 1:
        return (left * right).sum(-1)
    if left_rank == 1:
        return torch.matmul(left.unsqueeze(-2), right).squeeze(-2)
    if right_rank == 1:
        return torch.matmul(left, right.unsqueeze(-1)).squeeze(-1)
    return torch.matmul(left, right)


def _reduce_all(value: torch.Tensor) -> torch.Tensor:
    """Sum over a value's own dims, keeping [b, h]."""
    return value.sum(dim=tuple(range(_LEAD, value.dim()))) if value.dim() > _LEAD else value


def _call(func: str, args: list[Value]) -> Value:
    if func in ELEMENTWISE_FUNCTIONS:
        return ELEMENTWISE_FUNCTIONS[func](_dense(args[0]))
    if func == "outer":
        left, right = (_dense(a) for a in args)
        if _rank(left) != 1 or _rank(right) != 1:
            raise ValueError(f"outer needs two vectors, got ranks {_rank(left)} and {_rank(right)}")
        return left.unsqueeze(-1) * right.unsqueeze(-2)
    if func == "diag":
        (vector,) = args
        if _rank(vector) != 1:
            raise ValueError(f"diag needs a vector, got rank {_rank(vector)}")
        return _Diag(vector)
    if func == "sum":
        (value,) = args
        return value.vector.sum(-1) if isinstance(value, _Diag) else _reduce_all(value)
    if func == "l2norm":
        value = _dense(args[0])
        squares = _reduce_all(value * value)
        return value * _lift(torch.rsqrt(squares + L2NORM_EPS), _rank(value))
    raise ValueError(f"unknown function `{func}`")
