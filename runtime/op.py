"""The compiled-op object handed back to users."""
from __future__ import annotations

import logging

import hashlib

from ..codegen.analysis import Analysis
from ..dsl import ir
from ..dsl.printer import pretty

log = logging.getLogger("attnc")


class CompiledOp:
    """One compiled spec: `op(...)` runs kernels; `op.reference(...)` the fp64 oracle.

    Call contract (both): keyword tensors named as the spec's inputs and weights,
    inputs [B, T, H, dim] (per-token scalars [B, T, H]), weights [H, *dims], params as
    floats; `initial_state` ([N, H, *state dims], one per state), `output_final_state`,
    `cu_seqlens` (varlen, B = 1). Returns `(outputs, final_state)`; each is a single
    tensor when the spec has one output / one state, else a tuple.
    """

    def __init__(self, spec: ir.Spec, analysis: Analysis):
        self.spec = spec
        self.analysis = analysis
        self._plan_source: str | None = None
        self._plan_module = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cls(self) -> str:
        return self.analysis.cls

    def __repr__(self) -> str:
        return f"<attnc op {self.name}: class {self.cls}>"

    def pretty(self) -> str:
        return pretty(self.spec)

    def reference(self, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                  **kwargs):
        """The fp64 naive recurrence (the oracle): fp64 outputs and final states."""
        from ..codegen.reference import reference as run_reference
        from .binding import bind

        bound = bind(self.spec, kwargs, initial_state=initial_state, cu_seqlens=cu_seqlens)
        outputs, states = run_reference(self.spec, bound, output_final_state=output_final_state)
        return _unwrap(outputs), (_unwrap(states) if states is not None else None)

    def __call__(self, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                 chunk_size: int = 64, backend: str | None = None, **kwargs):
        """Run the generated kernels. `backend`: "triton" (default on CUDA, or on the CPU
        when Triton's interpreter is on) or "torch" (the plan in plain PyTorch)."""
        import torch

        from .binding import bind, expand_heads
        from .settings import settings

        if chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
        bound = bind(self.spec, kwargs, initial_state=initial_state, cu_seqlens=cu_seqlens)
        if backend is None:
            use_triton = bound.device.type == "cuda" or settings().interpret
            backend = "triton" if use_triton else "torch"
        elif backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        module = self.plan_module()

        H = bound.H
        values: dict[str, object] = {}
        for inp in self.spec.inputs:  # [B, T, H, D], scalars get D = 1
            x = expand_heads(bound.inputs[inp.name], H).float()
            values[inp.name] = x if inp.shape else x.unsqueeze(-1)
        for w in self.spec.weights:   # [1, 1, H, D]
            x = bound.weights[w.name].float()
            values[w.name] = x.reshape(1, 1, H, -1) if len(w.shape) <= 1 else x[None, None]
        values.update(bound.params)
        dtype = _stream_dtype(bound.inputs.values())
        states_in = bound.initial_states or (None,) * len(self.spec.states)
        states_in = tuple(None if s is None else s.float() for s in states_in)

        outputs, states = module.forward(
            values, states_in, shape=(bound.B, bound.T, H),
            output_final_state=output_final_state, cu_seqlens=bound.cu_seqlens,
            backend=backend, chunk_size=chunk_size, dtype=dtype,
        )
        shapes = {r.name: r.shape for r in self.analysis.readouts}
        outputs = tuple(
            (o if shapes[name] else o.squeeze(-1)).to(dtype)
            for name, o in zip(self.spec.outputs, outputs)
        )
        return _unwrap(outputs), (_unwrap(states) if states is not None else None)

    def plan_source(self) -> str:
        """The generated PyTorch plan module (raises NoChunkForm for classes without one)."""
        from .. import __version__
        from ..codegen.emit_torch import emit_plan
        from ..codegen.plan import plan_diagonal

        if self._plan_source is None:
            self._plan_source = emit_plan(plan_diagonal(self.analysis), __version__)
        return self._plan_source

    def plan_module(self):
        if self._plan_module is None:
            from .loader import load_module
            from .settings import settings

            source = self.plan_source()
            digest = hashlib.sha256(source.encode()).hexdigest()[:16]
            self._plan_module = load_module(
                source, f"attnc_plan_{self.name}_{digest}", settings().cache_dir / "modules")
        return self._plan_module


def _stream_dtype(tensors):
    """The dtype q/k/v stream in: the inputs' common floating dtype (fp64 runs as fp32)."""
    import torch

    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
        return next(iter(dtypes))
    return torch.float32


def _unwrap(values):
    values = tuple(values)
    return values[0] if len(values) == 1 else values
