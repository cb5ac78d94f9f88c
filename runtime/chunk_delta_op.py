"""`chunk_delta`: the delta-rule recurrence as a differentiable PyTorch op.

    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = q_t^T S_t

with D_t = I, exp(g_t) or diag(exp(g_t)) (DeltaNet, Gated DeltaNet, KDA). backend="triton"
runs kernels rendered from codegen/templates/chunk_delta.py.jinja for the gate of the call;
backend="torch" runs the same chunk algorithm in plain PyTorch.
"""
from __future__ import annotations

import torch

from ..codegen.chunk_delta import DeltaKernelSpec, chunk_delta_torch, render
from ..codegen.reference import L2NORM_EPS
from .kernels import KernelModules, LaunchOptions, check_backend, checked_decays, gate_kind

# rendered and imported modules, one per DeltaKernelSpec; one file per structure (the
# same name with another gate is another module)
MODULES = KernelModules(render, lambda spec: f"{spec.name}_{spec.gate}")


class ChunkDeltaFunction(torch.autograd.Function):
    """Autograd over the rendered module's forward and backward launchers. Saves the inputs
    (the inverse norms of those the kernels l2-normalise), the cumulated gate instead of the
    raw one, each chunk's inverse Z, with a per-channel gate the intra-chunk scores and, in
    groups of chunks (long sequences), each group's map of the state: the backward
    recomputes W and U' from Z, and the chunk states from the maps."""

    @staticmethod
    def module_for(spec: DeltaKernelSpec):
        return MODULES.get(spec)

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, cu_seqlens, spec, output_final_state, options, scale,
                out_dtype, l2norm_q, l2norm_k, decay_check):
        module = ChunkDeltaFunction.module_for(spec)
        # 1 / ||k|| and 1 / ||q|| come from the forward's first kernels that read k and q
        o, ht, saved = module.forward(q, k, v, beta, g, h0, cu_seqlens, output_final_state,
                                      scale=scale, out_dtype=out_dtype, l2norm_q=l2norm_q, l2norm_k=l2norm_k,
                                      keep=True, decay_check=decay_check, **options.as_kwargs())
        q_norm, k_norm = saved.q_norm, saved.k_norm
        # (the cumulated gate stands in for the raw one, of which the backward needs only
        # the shape and dtype)
        groups = (saved.groups.states, saved.groups.transitions) if saved.groups is not None else (None, None)
        ctx.save_for_backward(q, k, v, beta, saved.gate, saved.kk_scores, saved.qk_scores, saved.inverse, h0,
                              cu_seqlens, q_norm, k_norm, *groups)
        ctx.group_size = saved.groups.size if saved.groups is not None else 0
        ctx.saved_chunk_size = saved.chunk_size
        ctx.g_dtype = None if g is None else g.dtype
        ctx.spec = spec
        ctx.scale = scale
        ctx.options = options
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, beta, gate, kk_scores, qk_scores, inverse, h0, cu_seqlens, q_norm, k_norm,
         *groups) = ctx.saved_tensors
        nothing = (None,) * 15
        if do is None and dht is None:
            return nothing
        if do is None:
            do = torch.zeros(*v.shape, dtype=torch.float32, device=v.device)
        module = ChunkDeltaFunction.module_for(ctx.spec)
        groups = module.GroupMaps(ctx.group_size, *groups) if ctx.group_size else None
        saved = module.Saved(gate, kk_scores, qk_scores, ctx.saved_chunk_size, ctx.g_dtype, inverse=inverse,
                             groups=groups)
        grads = module.backward(q, k, v, beta, gate, h0, cu_seqlens, do, dht, scale=ctx.scale,
                                q_norm=q_norm, k_norm=k_norm, saved=saved, **ctx.options.as_kwargs())
        dq, dk, dv, dbeta, dg, dh0 = (
            None if grad is None else grad.to(dtype)
            for grad, dtype in zip(grads, (q.dtype, k.dtype, v.dtype, beta.dtype, ctx.g_dtype,
                                           None if h0 is None else h0.dtype))
        )
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None, None, None, None, None, None


def chunk_delta(q, k, v, beta, g=None, h0=None, cu_seqlens=None, *, output_final_state: bool,
                chunk_size: int = 64, backend: str = "triton", name: str = "delta",
                input_precision: str = "tf32", poison: bool | None = None,
                config: dict | None = None, scale: float = 1.0,
                out_dtype: torch.dtype | None = None, l2norm_q: bool = False, l2norm_k: bool = False,
                decay_check=None):
    """(o, ht) of S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T, o_t = q_t^T S_t.

    q, k: [B, T, H, K]; v: [B, T, H, V] (fp32, fp16 or bf16; scale folded into q, keys
    l2-normalised by the caller unless l2norm_k); beta: [B, T, H]; g: None (D_t = I), [B, T, H] (scalar
    decay exp(g_t)) or [B, T, H, K] (per-channel decay) log gates <= 0; h0: None or
    [N, H, K, V]; cu_seqlens: None or [N + 1] offsets of sequences packed along T (then B == 1).
    o is [B, T, H, V] fp32; ht is [N, H, K, V] fp32 when `output_final_state`, else None.
    Gradients flow to q, k, v, beta, g and h0.

    scale, out_dtype: o = scale * q_t^T S_t, stored in out_dtype (default fp32) by the
    kernel itself: a readout's constant factor and the output's dtype, with no pass after.
    l2norm_q, l2norm_k: the recurrence reads l2norm(q) / l2norm(k) (x / sqrt(sum(x * x) +
    eps)); the kernels normalise the rows as they load them, so no pass writes the
    normalised tensors, and gradients flow to the raw ones.

    name: prefix of the generated kernels. input_precision: tl.dot precision for fp32 inputs
    on a GPU ("ieee" for full fp32). poison: NaN-fill kernel buffers before they are written
    (default: ATTNC_POISON).
    config: tuned launch values overriding the kernels' defaults (keys: the rendered module's
    TUNABLE, e.g. num_warps, block_k; runtime/autotune.py), forward and backward alike;
    the "torch" backend ignores it.
    decay_check: None, or a DecayCheck (runtime/kernels.py) of g: the kernel that
    cumulates g checks that every log gate is <= 0 and the check asserts it (DecayError,
    on a GPU a device-side assert with its message)."""
    check_backend(backend, input_precision)
    spec = DeltaKernelSpec(name=name, gate=gate_kind(q, g))
    if decay_check is not None and g is None:
        raise ValueError("decay_check: this call has no log gate (g) to check")
    if backend == "torch":
        q = _l2norm(q) if l2norm_q else q
        k = _l2norm(k) if l2norm_k else k
        l2norm_q = l2norm_k = False
    if backend == "torch":
        checked_decays(decay_check, g)
        o, ht = chunk_delta_torch(q, k, v, beta, g, h0, cu_seqlens, output_final_state, chunk_size)
        return (o * scale).to(out_dtype or torch.float32), ht
    options = LaunchOptions.for_call(q.device, chunk_size=chunk_size, input_precision=input_precision,
                                     poison=poison, config=config)
    return ChunkDeltaFunction.apply(q, k, v, beta, g, h0, cu_seqlens, spec, output_final_state, options,
                                    float(scale), out_dtype, bool(l2norm_q), bool(l2norm_k), decay_check)


def _l2norm(x):
    """l2norm over the last dim in PyTorch (differentiable), in x's dtype."""
    y = x.float()
    return (y * torch.rsqrt((y * y).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)
