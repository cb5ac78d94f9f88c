"""Validate the arguments of one call to a compiled spec and bind them.

`bind` is the single gate between a user's tensors and everything that computes: the
fp64 reference and the kernels both take the `Bound` it returns, so both see the same
dims, head layout, params and sequence boundaries. Every problem is a `ValueError` that
names the argument, the expected shape spelled with dim names and numbers, and what was
passed instead.

Call layout (see dsl/ir.py):
  input  `q[K]`        [B, T, H_q, K]; a per-token scalar `alpha` is [B, T, H_alpha]
  weight `u[K]`        [H, K]; `D` is [H]
  state  `S[K, V]`     initial_state [N, H, K, V], N = B, or the number of sequences
                       under `cu_seqlens`
H is the largest head count among the inputs. An input may have fewer heads H_i when
H % H_i == 0: head h then reads head h // (H // H_i) of it (GQA/GVA sharing, the layout
`repeat_interleave` produces).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from ..dsl.evaluate import evaluate_scalar
from ..dsl.ir import Spec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = "float32, float16, bfloat16 or float64"


@dataclass(frozen=True, eq=False)
class Bound:
    """The validated arguments of one call. Tensors are the caller's own (no copies)."""

    inputs: Mapping[str, torch.Tensor]    # [B, T, H_i, *dims], in spec order
    weights: Mapping[str, torch.Tensor]   # [H, *dims], in spec order
    params: Mapping[str, float]           # defaults evaluated, keyword overrides applied
    dims: Mapping[str, int]               # K, V, ... bound from the tensors
    B: int
    T: int
    H: int                                # largest head count among the inputs
    N: int                                # number of sequences: B, or len(cu_seqlens) - 1
    initial_states: tuple[torch.Tensor | None, ...] | None  # one per spec state, [N, H, *dims]
    cu_seqlens: torch.Tensor | None       # int64 [N + 1], 0 = ... = T, on the inputs' device

    @property
    def device(self) -> torch.device:
        return next(iter(self.inputs.values())).device

    def heads(self, name: str) -> int:
        """Head count of input `name` (H, or fewer under GQA/GVA sharing)."""
        return self.inputs[name].shape[2]

    @property
    def stream_dtype(self) -> torch.dtype:
        """The dtype the kernels stream q/k/v in and the outputs come back in: the inputs'
        half-precision dtype where they have one, else fp32 (fp64 runs as fp32). An fp32
        gate or scalar beside bf16 activations (as models compute their gates) is read as
        it is and does not make the whole call fp32; bf16 beside fp16 does."""
        return stream_dtype(self.inputs.values())


def stream_dtype(tensors) -> torch.dtype:
    """`Bound.stream_dtype` of these input tensors."""
    halves = {t.dtype for t in tensors} & {torch.float16, torch.bfloat16}
    return halves.pop() if len(halves) == 1 else torch.float32


def expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, H_i, ...] -> [B, T, H, ...]: head h takes head h // (H // H_i) of `x`."""
    heads = x.shape[2]
    if heads == H:
        return x
    if heads == 0 or H % heads:
        raise ValueError(f"cannot share {heads} heads among H = {H} heads: H must be a multiple of {heads}")
    return x.repeat_interleave(H // heads, dim=2)


def bind(
    spec: Spec,
    kwargs: Mapping[str, Any],
    *,
    initial_state: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> Bound:
    """Check `kwargs` (inputs, weights and param overrides by name) against `spec`."""
    key = _call_signature(spec, kwargs, initial_state, cu_seqlens)
    sizes = _CHECKED.get(key) if key is not None else None
    if sizes is not None:  # these shapes, dtypes and devices passed every check before
        return _rebind(spec, kwargs, initial_state, sizes)
    bound = _bind(spec, kwargs, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = (bound.params, bound.dims, bound.B, bound.T, bound.H, bound.N)
    return bound


# Calls whose arguments passed every check, by signature (spec, argument names, shapes,
# dtypes, devices and param values), with what they bound: a call with the same
# signature binds without the checks. Training and decode loops repeat one signature,
# and the checks cost ~20 us of host time a call. Holds no tensors.
_CHECKED: dict[tuple, tuple] = {}
_CHECKED_MAX = 256


def _call_signature(spec: Spec, kwargs: Mapping[str, Any], initial_state, cu_seqlens) -> tuple | None:
    """What the checks of `bind` depend on, or None where they read values (cu_seqlens) or
    an argument is neither a tensor nor a number."""
    if cu_seqlens is not None:
        return None
    parts: list = [spec]
    tensor_names = _tensor_names(spec)
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and name in tensor_names:
            parts.append((name, type(value), value.shape, value.dtype, value.device))
        elif type(value) in (int, float):
            parts.append((name, repr(value)))  # repr: 1 and 1.0, 0.0 and -0.0 differ
        else:
            return None
    if initial_state is not None:
        states = (initial_state,) if isinstance(initial_state, torch.Tensor) else initial_state
        if not isinstance(states, (tuple, list)):
            return None
        for state in states:
            if state is None:
                parts.append(None)
            elif isinstance(state, torch.Tensor):
                parts.append((type(state), state.shape, state.dtype, state.device))
            else:
                return None
        parts.append(isinstance(initial_state, torch.Tensor))
    return tuple(parts)


def _rebind(spec: Spec, kwargs: Mapping[str, Any], initial_state, sizes) -> Bound:
    params, dims, B, T, H, N = sizes
    states = None
    if initial_state is not None:
        states = (initial_state,) if isinstance(initial_state, torch.Tensor) else tuple(initial_state)
    required, _ = _argument_names(spec)
    n_inputs = len(spec.inputs)
    return Bound(
        inputs=MappingProxyType({name: kwargs[name] for name in required[:n_inputs]}),
        weights=MappingProxyType({name: kwargs[name] for name in required[n_inputs:]}),
        params=params, dims=dims, B=B, T=T, H=H, N=N, initial_states=states, cu_seqlens=None,
    )


def _bind(spec, kwargs, *, initial_state, cu_seqlens) -> Bound:
    _check_names(spec, kwargs)
    table = _DimTable()
    inputs = _bind_inputs(spec, kwargs, table)
    weights = _bind_weights(spec, kwargs, table)
    unbound = [d.name for d in spec.dims if d.name not in table.values]
    if unbound:
        raise ValueError(
            f"{spec.name}: dim(s) {', '.join(unbound)} appear in no input or weight shape, "
            "so no argument gives their size"
        )
    first = spec.inputs[0].name
    device = inputs[first].device
    _check_devices({**inputs, **weights}, device, first)
    params = _bind_params(spec, kwargs, table.dims())
    B, T, H = table.values["B"], table.values["T"], table.values["H"]
    cu = None
    N = B
    if cu_seqlens is not None:
        cu = _bind_cu_seqlens(cu_seqlens, spec, inputs, table, device)
        N = cu.numel() - 1
    states = _bind_initial_states(spec, initial_state, table, N, device, cu is not None)
    return Bound(
        inputs=MappingProxyType(inputs),
        weights=MappingProxyType(weights),
        params=MappingProxyType(params),
        dims=MappingProxyType(table.dims()),
        B=B,
        T=T,
        H=H,
        N=N,
        initial_states=states,
        cu_seqlens=cu,
    )


# ---------------------------------------------------------------- names
@lru_cache(maxsize=256)
def _argument_names(spec: Spec) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the required argument names, every name a call may pass) of `spec`, worked out
    once per spec: a decode step binds its arguments on every token."""
    required = tuple(i.name for i in spec.inputs) + tuple(w.name for w in spec.weights)
    return required, frozenset(required) | {p.name for p in spec.params}


@lru_cache(maxsize=256)
def _tensor_names(spec: Spec) -> frozenset[str]:
    """Names whose value binds by its shape alone (inputs and weights, not params: a param
    passed as a one-element tensor binds by its value)."""
    return frozenset(_argument_names(spec)[0])


def _check_names(spec: Spec, kwargs: Mapping[str, Any]) -> None:
    required, known = _argument_names(spec)
    missing = [n for n in required if n not in kwargs]
    unknown = [n for n in kwargs if n not in known]
    if not missing and not unknown:
        return
    problems = []
    if missing:
        problems.append(f"missing argument(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown argument(s) {', '.join(unknown)}")
    raise ValueError(f"{spec.name}: {'; '.join(problems)}; expected {_signature(spec)}")


def _signature(spec: Spec) -> str:
    parts = ["inputs " + ", ".join(_decl(i.name, i.shape) for i in spec.inputs)]
    if spec.weights:
        parts.append("weights " + ", ".join(_decl(w.name, w.shape) for w in spec.weights))
    if spec.params:
        parts.append("optional params " + ", ".join(p.name for p in spec.params))
    return "; ".join(parts)


def _decl(name: str, shape: tuple[str, ...]) -> str:
    return f"{name}[{', '.join(shape)}]" if shape else name


# ---------------------------------------------------------------- dims
class _DimTable:
    """Sizes bound so far (B, T, H and the spec's dims) and which argument bound each."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.origin: dict[str, str] = {}

    def bind(self, dim: str, size: int, origin: str) -> None:
        self.values[dim] = size
        self.origin[dim] = origin

    def dims(self) -> dict[str, int]:
        return {d: v for d, v in self.values.items() if d not in ("B", "T", "H")}


def _shape_list(values: Sequence[object]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _shape_error(
    arg: str,
    names: Sequence[str],
    expected: Sequence[object],
    actual: Sequence[int],
    note: str = "",
) -> ValueError:
    note = f" ({note})" if note else ""
    return ValueError(
        f"{arg}: expected shape {_shape_list(names)} = {_shape_list(expected)}{note}, "
        f"got {_shape_list(actual)}"
    )


def _tensor(arg: str, value: Any, names: Sequence[str]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{arg}: expected a torch.Tensor of shape {_shape_list(names)}, got {type(value).__name__}"
        )
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{arg}: expected a floating tensor ({_FLOAT_NAMES}) of shape {_shape_list(names)}, "
            f"got {value.dtype} of shape {_shape_list(value.shape)}"
        )
    if value.dim() != len(names):
        raise ValueError(
            f"{arg}: expected shape {_shape_list(names)} ({len(names)} dims), "
            f"got {_shape_list(value.shape)} ({value.dim()} dims)"
        )
    return value


def _match(arg: str, names: Sequence[str], tensor: torch.Tensor, table: _DimTable, skip: str = "") -> None:
    """Compare `tensor`'s sizes with the bound ones; bind the dims seen for the first time
    (a dim named twice in one shape must have one size)."""
    values = table.values
    for dim, size in zip(names, tensor.shape):
        if dim == skip:
            continue
        bound = values.get(dim)
        if bound is None:
            table.bind(dim, size, arg)
        elif bound != size:
            expected = [values.get(d, n) if d != skip else n for d, n in zip(names, tensor.shape)]
            clashes = [f"{d} bound by {table.origin[d]}" for d, n in zip(names, tensor.shape)
                       if d != skip and values.get(d, n) != n]
            raise _shape_error(arg, names, expected, list(tensor.shape), "; ".join(dict.fromkeys(clashes)))


def _bind_inputs(spec: Spec, kwargs: Mapping[str, Any], table: _DimTable) -> dict[str, torch.Tensor]:
    if not spec.inputs:
        raise ValueError(f"{spec.name}: declares no inputs, so B, T and H cannot be bound")
    names = {i.name: ("B", "T", "H", *i.shape) for i in spec.inputs}
    inputs = {n: _tensor(n, kwargs[n], names[n]) for n in names}
    widest = max(inputs, key=lambda n: inputs[n].shape[2])
    H = inputs[widest].shape[2]
    table.bind("H", H, widest)
    for name, tensor in inputs.items():
        heads = tensor.shape[2]
        if heads == 0 or H % heads:
            expected = list(tensor.shape)
            expected[2] = H
            raise _shape_error(
                name, names[name], expected, tensor.shape,
                f"H = {H} bound by {widest}; an input may have fewer heads only if they divide H",
            )
        _match(name, names[name], tensor, table, skip="H")
    if table.values["B"] == 0 or table.values["T"] == 0:
        first = spec.inputs[0].name
        raise ValueError(
            f"{first}: expected shape {_shape_list(names[first])} with B >= 1 and T >= 1, "
            f"got {_shape_list(inputs[first].shape)}"
        )
    return inputs


def _bind_weights(spec: Spec, kwargs: Mapping[str, Any], table: _DimTable) -> dict[str, torch.Tensor]:
    weights = {}
    for weight in spec.weights:
        names = ("H", *weight.shape)
        tensor = _tensor(weight.name, kwargs[weight.name], names)
        _match(weight.name, names, tensor, table)
        weights[weight.name] = tensor
    return weights


def _check_devices(tensors: Mapping[str, torch.Tensor], device: torch.device, first: str) -> None:
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(
                f"{name}: expected a tensor on {device} (like {first}), got one on {tensor.device} "
                f"of shape {_shape_list(tensor.shape)}"
            )


# ---------------------------------------------------------------- params
def _bind_params(spec: Spec, kwargs: Mapping[str, Any], dims: Mapping[str, int]) -> dict[str, float]:
    if not any(param.name in kwargs for param in spec.params):
        return dict(_default_params(spec, tuple(dims.items())))
    env: dict[str, float] = {d: float(v) for d, v in dims.items()}
    params: dict[str, float] = {}
    for param in spec.params:
        if param.name in kwargs:
            value = _number(param.name, kwargs[param.name])
        else:
            value = _default(param, env)
        params[param.name] = value
        env[param.name] = value
    return params


@lru_cache(maxsize=256)
def _default_params(spec: Spec, dims: tuple[tuple[str, int], ...]) -> tuple[tuple[str, float], ...]:
    """Every param at its default for these dims (evaluated once per spec and dims)."""
    env: dict[str, float] = {d: float(v) for d, v in dims}
    for param in spec.params:
        env[param.name] = _default(param, env)
    return tuple((param.name, env[param.name]) for param in spec.params)


def _default(param, env: Mapping[str, float]) -> float:
    try:
        return evaluate_scalar(param.default, env)
    except (ValueError, ArithmeticError) as err:
        raise ValueError(f"{param.name}: cannot evaluate the default: {err}") from None


def _number(arg: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{arg}: expected a number (a call-time param), got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {_shape_list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return type(value).__name__


# ---------------------------------------------------------------- varlen
def _bind_cu_seqlens(
    cu_seqlens: Any,
    spec: Spec,
    inputs: Mapping[str, torch.Tensor],
    table: _DimTable,
    device: torch.device,
) -> torch.Tensor:
    T = table.values["T"]
    wanted = f"a strictly increasing 1-D integer tensor [N + 1] from 0 to T = {T}"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens: expected {wanted}, got {type(cu_seqlens).__name__}")
    shape = _shape_list(cu_seqlens.shape)
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens: expected {wanted}, got {cu_seqlens.dtype} of shape {shape}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected {wanted} (at least 2 entries), got shape {shape}")
    if cu_seqlens.device != device:
        first = spec.inputs[0].name
        raise ValueError(
            f"cu_seqlens: expected a tensor on {device} (like {first}), got one on {cu_seqlens.device}"
        )
    first = spec.inputs[0].name
    if table.values["B"] != 1:
        names = ("B", "T", "H", *spec.inputs[0].shape)
        expected = [1, *inputs[first].shape[1:]]
        raise ValueError(
            f"cu_seqlens packs sequences along T and needs B == 1: {first}: expected shape "
            f"{_shape_list(names)} = {_shape_list(expected)}, got {_shape_list(inputs[first].shape)}"
        )
    checked = _CHECKED_BOUNDS.get(id(cu_seqlens))
    version = _version(cu_seqlens)
    if checked is not None and checked[0]() is cu_seqlens and checked[1:3] == (version, T):
        return cu_seqlens if checked[3] is None else checked[3]
    # one host sync: the boundaries must be valid before anything indexes with them
    bounds = cu_seqlens.tolist()
    increasing = all(a < b for a, b in zip(bounds, bounds[1:]))
    if bounds[0] != 0 or bounds[-1] != T or not increasing:
        shown = bounds if len(bounds) <= 16 else [*bounds[:8], "...", *bounds[-4:]]
        raise ValueError(
            f"cu_seqlens: expected {wanted} (no empty sequences), got {_shape_list(shown)} of shape {shape}"
        )
    wide = cu_seqlens.to(torch.int64)
    if version is not None:
        key = id(cu_seqlens)
        # (an int64 tensor is handed on itself, and not held here: that would keep it alive)
        _CHECKED_BOUNDS[key] = (weakref.ref(cu_seqlens, lambda _: _CHECKED_BOUNDS.pop(key, None)),
                                version, T, None if wide is cu_seqlens else wide)
    return wide


# cu_seqlens tensors whose boundaries passed the checks, by id: (weak reference, version,
# T, the int64 copy handed on, or None when the tensor is int64 itself). Reading them is a host sync, and a model hands the same
# tensor to every layer's forward and backward: each tensor (and each in-place change of
# it, which bumps its version) is read once. The int64 tensor is the same each time, so
# the kernels' chunk layouts, kept per tensor, are computed once too.
_CHECKED_BOUNDS: dict[int, tuple] = {}


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (None for inference-mode tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


# ---------------------------------------------------------------- initial states
def _bind_initial_states(
    spec: Spec,
    initial_state: Any,
    table: _DimTable,
    N: int,
    device: torch.device,
    varlen: bool,
) -> tuple[torch.Tensor | None, ...] | None:
    if initial_state is None:
        return None
    layouts = ", ".join(_decl(s.name, ("N", "H", *s.shape)) for s in spec.states)
    if not spec.states:
        raise ValueError(f"initial_state: {spec.name} declares no state, so it takes no initial_state")
    if isinstance(initial_state, torch.Tensor):
        if len(spec.states) != 1:
            raise ValueError(
                f"initial_state: expected a tuple of {len(spec.states)} tensors "
                f"(one per state: {layouts}), got a single tensor of shape {_shape_list(initial_state.shape)}"
            )
        initial_state = (initial_state,)
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != len(spec.states):
        raise ValueError(
            f"initial_state: expected {len(spec.states)} tensor(s), one per state ({layouts}), "
            f"got {_describe(initial_state)}"
        )
    table = _with_n(table, N, "cu_seqlens" if varlen else "B")
    bound: list[torch.Tensor | None] = []
    for state, value in zip(spec.states, initial_state):
        if value is None:
            bound.append(None)
            continue
        arg = "initial_state" if len(spec.states) == 1 else f"initial_state[{state.name}]"
        names = ("N", "H", *state.shape)
        tensor = _tensor(arg, value, names)
        _match(arg, names, tensor, table)
        if tensor.device != device:
            first = spec.inputs[0].name
            raise ValueError(f"{arg}: expected a tensor on {device} (like {first}), got one on {tensor.device}")
        bound.append(tensor)
    return tuple(bound)


def _with_n(table: _DimTable, N: int, origin: str) -> _DimTable:
    extended = _DimTable()
    extended.values = {**table.values, "N": N}
    extended.origin = {**table.origin, "N": origin}
    return extended
