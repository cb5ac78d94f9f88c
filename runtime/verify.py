"""Check a compiled op's kernels against its fp64 reference: values, final states and
the gradients of every input, weight and initial state, by relative RMS error."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .binding import stream_dtype
from .op import CompiledOp
from .sampling import random_arguments


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp64 (inf when actual has NaN/inf)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


@dataclass(frozen=True)
class Verification:
    name: str
    errors: dict[str, float]   # quantity -> rel. RMS error
    tolerance: float

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1])

    @property
    def ok(self) -> bool:
        return self.worst[1] <= self.tolerance


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def verify(op: CompiledOp, *, B: int = 2, T: int = 100, H: int = 2, K: int = 32, V: int = 32,
           dtype=torch.float32, device="cpu", backend: str | None = None, seed: int = 0,
           initial_state: bool = True, final_state: bool = True,
           seqlens: list[int] | None = None, heads: dict[str, int] | None = None,
           arguments: dict[str, torch.Tensor] | None = None, chunk_size: int = 64,
           tolerance: float | None = None, config: dict | None = None,
           dtypes: dict[str, torch.dtype] | None = None) -> Verification:
    """Run `op` and its reference on the same fresh random data and compare.

    `seqlens` packs that many sequences into one row (B = 1, cu_seqlens); `heads`
    gives some inputs fewer heads (GQA/GVA); `arguments` overrides drawn tensors;
    `config` fixes the launchers' config (e.g. {"fused_forward": 1}) instead of tuning;
    `dtypes` gives some inputs a dtype of their own (an fp32 gate beside bf16 activations:
    drawn in fp32, then each converted to its dtype). Outputs must come back in the stream
    dtype (`Bound.stream_dtype`).
    """
    gen = torch.Generator().manual_seed(seed)
    dims = {"K": K, "V": V}
    for d in op.spec.dims:
        dims.setdefault(d.name, 16)
    cu_seqlens = None
    if seqlens is not None:
        B, T = 1, sum(seqlens)
        cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=device)
    N = len(seqlens) if seqlens is not None else B
    dtypes = dtypes or {}
    unknown = set(dtypes) - {i.name for i in op.spec.inputs} - {w.name for w in op.spec.weights}
    if unknown:
        raise ValueError(f"dtypes: {', '.join(sorted(unknown))} is not an input or weight of {op.name}")
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=torch.float32 if dtypes else dtype,
                            device=device, generator=gen, heads=heads)
    args.update(arguments or {})
    args = {n: t.to(device=device, dtype=dtypes.get(n, dtype)) for n, t in args.items()}
    streamed = stream_dtype(args[i.name] for i in op.spec.inputs)
    args = {n: t.detach().requires_grad_() for n, t in args.items()}
    h0 = tuple(torch.randn(N, H, *(dims[d] for d in s.shape), generator=gen).to(device)
               .requires_grad_() for s in op.spec.states) if initial_state else ()

    def state_arg(states):
        if not states:
            return None
        return states[0] if len(states) == 1 else states

    out, ht = op(**args, initial_state=state_arg(h0), output_final_state=final_state,
                 cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size, config=config,
                 precision="ieee" if streamed == torch.float32 else "tf32")
    ref_args = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    ref_h0 = tuple(s.detach().double().requires_grad_() for s in h0)
    ref_out, ref_ht = op.reference(**ref_args, initial_state=state_arg(ref_h0),
                                   output_final_state=final_state, cu_seqlens=cu_seqlens)
    if not final_state and ht is not None:
        raise AssertionError("a final state came back although none was asked for")

    errors: dict[str, float] = {}
    got = _as_tuple(out) + (_as_tuple(ht) if final_state else ())
    want = _as_tuple(ref_out) + (_as_tuple(ref_ht) if final_state else ())
    names = list(op.spec.outputs) + ([f"final {s.name}" for s in op.spec.states] if final_state else [])
    for name, a, e in zip(names, got, want):
        if a.shape != e.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)}, reference {tuple(e.shape)}")
        if name in op.spec.outputs and a.dtype != streamed:
            raise AssertionError(f"{name}: dtype {a.dtype}, expected the stream dtype {streamed}")
        errors[name] = rel_rms(a, e)
    cotangents = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in want]
    leaves = list(args.values()) + list(h0)
    ref_leaves = list(ref_args.values()) + list(ref_h0)
    grads = torch.autograd.grad([a.float() for a in got], leaves,
                                [c.to(device=device, dtype=torch.float32) for c in cotangents],
                                allow_unused=True)
    ref_grads = torch.autograd.grad(want, ref_leaves, [c.to(device) for c in cotangents],
                                    allow_unused=True)
    leaf_names = list(args) + [f"initial {s.name}" for s in op.spec.states][: len(h0)]
    for name, g, e in zip(leaf_names, grads, ref_grads):
        if e is None:
            continue
        key = f"d({name})" if name.startswith("initial") else f"d{name}"
        errors[key] = float("inf") if g is None else rel_rms(g, e)
    if tolerance is None:
        tolerance = 1e-4 if streamed == torch.float32 else 2e-2
    return Verification(op.name, errors, tolerance)
