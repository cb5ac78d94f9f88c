"""Check a compiled op's kernels against its fp64 reference: values, final states and
the gradients of every input, weight and initial state, by relative RMS error."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
           tolerance: float | None = None) -> Verification:
    gen = torch.Generator().manual_seed(seed)
    dims = {"K": K, "V": V}
    for d in op.spec.dims:
        dims.setdefault(d.name, 16)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype, device=device,
                            generator=gen, requires_grad=True)
    h0 = tuple(torch.randn(B, H, *(dims[d] for d in s.shape), generator=gen).to(device)
               .requires_grad_() for s in op.spec.states)
    init = h0[0] if len(h0) == 1 else h0

    out, ht = op(**args, initial_state=init, output_final_state=True, backend=backend)
    ref_args = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    ref_h0 = tuple(s.detach().double().requires_grad_() for s in h0)
    ref_out, ref_ht = op.reference(**ref_args, initial_state=ref_h0[0] if len(ref_h0) == 1
                                   else ref_h0, output_final_state=True)

    errors: dict[str, float] = {}
    got = _as_tuple(out) + _as_tuple(ht)
    want = _as_tuple(ref_out) + _as_tuple(ref_ht)
    names = list(op.spec.outputs) + [f"final {s.name}" for s in op.spec.states]
    for name, a, e in zip(names, got, want):
        errors[name] = rel_rms(a, e)
    cotangents = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in want]
    leaves = list(args.values()) + list(h0)
    ref_leaves = list(ref_args.values()) + list(ref_h0)
    grads = torch.autograd.grad([a.float() for a in got], leaves,
                                [c.to(device=device, dtype=torch.float32) for c in cotangents],
                                allow_unused=True)
    ref_grads = torch.autograd.grad(want, ref_leaves, [c.to(device) for c in cotangents],
                                    allow_unused=True)
    leaf_names = list(args) + [f"initial {s.name}" for s in op.spec.states]
    for name, g, e in zip(leaf_names, grads, ref_grads):
        if e is None:
            continue
        errors[f"d{name}" if not name.startswith("initial") else f"d({name})"] = (
            float("inf") if g is None else rel_rms(g, e))
    if tolerance is None:
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return Verification(op.name, errors, tolerance)
