"""`chunk_diag`: the diagonal-transition recurrence as a differentiable PyTorch op.

    S_t = diag(exp(g_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T,   o_t = q_t^T S_t  (or S_{t-1})

backend="triton" runs kernels rendered from codegen/templates/chunk_diag.py.jinja for the
structure of the call (which gates, exclusive or not); backend="torch" runs the same chunk
algorithm in plain PyTorch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..codegen.chunk_diag import DiagKernelSpec, ScalarMapCode, chunk_diag_torch, render
from .kernels import KernelModules, LaunchOptions, check_backend, checked_decays, gate_kind


@dataclass(frozen=True)
class InputMap:
    """An operand as an elementwise function f of a raw input x, which the op then takes in
    its place: its kernels compute f(x) as they load x and multiply the operand's gradient
    by f'(x), so no pass writes f(x) or reads its gradient. As `gate_map`, a per-channel
    log gate (gla's logsigmoid(x) / 16); as `query_map` / `key_map`, a feature map of q or
    k (linear_attn's elu(x) + 1). A compiled spec's plan builds these (codegen/plan.py)."""
    triton: str                                        # f, Triton code of `x`
    triton_grad: str                                   # f', Triton code of `x`
    torch: Callable[[torch.Tensor], torch.Tensor]      # f on fp32 tensors, for backend="torch"


@dataclass(frozen=True)
class ScalarMap:
    """A scalar log gate, and the keys' per-token factor beside it, as functions of raw
    tensors, which the op then takes in their place (mamba2's -exp(A_log) softplus(dt +
    dt_bias) and softplus(dt + dt_bias) of dt and the per-head weights A_log, dt_bias): its
    cumsum kernel computes both as it loads the raw tensors and its gate-gradient kernel
    applies the chain rule, so no pass writes them or reads their gradients. A compiled
    spec's plan builds these (codegen/plan.py, ChunkCall.scalar_inputs)."""
    code: ScalarMapCode
    # (log gate, key factor or None) of the raw tensors (per-token ones [B, T, H], per-head
    # ones [H]) in fp32, for backend="torch"
    torch: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def kernel_spec(q: torch.Tensor, g, gv, exclusive: bool, name: str | None = None,
                gate_map: InputMap | None = None, query_map: InputMap | None = None,
                key_map: InputMap | None = None, scalar_map: ScalarMap | None = None) -> DiagKernelSpec:
    """The structure a call needs. Kernels are named `name` (a compiled spec passes its
    own, e.g. gla_S) or after the structure (e.g. diag_channel_vgate)."""
    if scalar_map is not None:
        if g is not None or gv is not None:
            raise ValueError("scalar_map computes the scalar log gate from scalar_inputs: pass g=None "
                             "and gv=None")
        return _kernel_spec("scalar", False, bool(exclusive), name, None, query_map, key_map, scalar_map.code)
    gate = gate_kind(q, g)
    if gate_map is not None and gate != "channel":
        raise ValueError(f"gate_map is for per-channel gates [B, T, H, K]; g has shape "
                         f"{None if g is None else tuple(g.shape)}")
    if (query_map is not None or key_map is not None) and gv is not None:
        raise ValueError("query_map and key_map are not taken with a V-side gate (gv): compute the feature "
                         "map before the call")
    return _kernel_spec(gate, gv is not None, bool(exclusive), name, gate_map, query_map, key_map)


@functools.lru_cache(maxsize=256)
def _kernel_spec(gate: str, vgate: bool, exclusive: bool, name: str | None,
                 gate_map: InputMap | None, query_map: InputMap | None,
                 key_map: InputMap | None, scalar_map: ScalarMapCode | None = None) -> DiagKernelSpec:
    # one per structure: a call asks on every step of a training loop
    if name is None:
        name = f"diag_{gate}" + ("_vgate" if vgate else "") + ("_exclusive" if exclusive else "")
    mapped = {}
    for role, f in (("gate", gate_map), ("query", query_map), ("key", key_map)):
        if f is not None:
            mapped.update({f"{role}_map": f.triton, f"{role}_map_grad": f.triton_grad})
    return DiagKernelSpec(name=name, gate=gate, vgate=vgate, exclusive=exclusive, scalar_map=scalar_map, **mapped)


# rendered and imported modules, one per DiagKernelSpec
MODULES = KernelModules(render, lambda spec: spec.name)


class ChunkDiagFunction(torch.autograd.Function):
    """Autograd over the rendered module's forward and backward launchers."""

    @staticmethod
    def module_for(spec: DiagKernelSpec):
        return MODULES.get(spec)

    @staticmethod
    def forward(ctx, q, k, v, g, gv, h0, cu_seqlens, spec, output_final_state, options, scale,
                out_dtype, residual, residual_scale, key_scale, keep, decay_check, *scalar_inputs):
        module = ChunkDiagFunction.module_for(spec)
        if spec.scalar_map is not None:
            g = scalar_inputs  # the module computes the log gate from them
        if not keep:
            # no backward can follow (grad mode off, or no input needs a gradient): nothing
            # to keep, and the kernels skip what only the backward would read
            return module.forward(q, k, v, g, gv, h0, cu_seqlens, output_final_state, scale=scale,
                                  out_dtype=out_dtype, residual=residual, residual_scale=residual_scale,
                                  key_scale=key_scale, decay_check=decay_check, **options.as_kwargs())
        o, ht, saved = module.forward(q, k, v, g, gv, h0, cu_seqlens, output_final_state,
                                      scale=scale, out_dtype=out_dtype, residual=residual,
                                      residual_scale=residual_scale, key_scale=key_scale, keep=True,
                                      decay_check=decay_check, **options.as_kwargs())
        # The backward reuses the forward's cumulated gates (kept instead of the raw gates,
        # whose shapes and dtypes are all it needs of them, unless a gate map's derivative
        # reads the raw input) and, with a per-channel gate, its intra-chunk scores. A
        # per-channel K-side gate is kept raw: the backward's cumsum pass cumulates it again
        # (bf16 g instead of an fp32 cumsum, and g is often held anyway). o is an output
        # anyway; the V-side gate gradient needs it.
        # (with a scalar map its raw tensors, which the gate-gradient kernel reads, and the keys'
        # factor it computed) A long sequence's state pass in groups of chunks: their phase 1
        # (a state per group), which the backward's recompute of the chunk states starts from.
        # With a per-channel gate, each chunk's b_last (4 MB at 16 x 2048, K = 128), which
        # tells the backward's scores-gradient kernel the chunks the dq / dk kernel takes whole.
        groups = saved.groups.buffers() if saved.groups is not None else (None, None, None)
        raw_g = g if spec.gate_map or spec.gate == "channel" else None
        ctx.save_for_backward(q, k, v, saved.gate, raw_g, saved.vgate, saved.scores,
                              h0, cu_seqlens, o if spec.vgate else None, None if residual is v else residual,
                              residual_scale, key_scale, saved.key_scale, saved.chunk_gate, *groups,
                              *scalar_inputs)
        ctx.group_size = saved.groups.size if saved.groups is not None else 0
        ctx.saved_chunk_size = saved.chunk_size
        ctx.gate_dtypes = (None if g is None or spec.scalar_map is not None else g.dtype,
                           None if gv is None else gv.dtype)
        ctx.spec = spec
        # the residual term's input is the value operand itself (saved once, as v)
        ctx.residual_is_v = residual is v
        ctx.scale = scale
        ctx.options = options
        # the key and the log gate are features of one raw input: one gradient, summed by the
        # gate-gradient kernel
        ctx.key_into_gate = bool(spec.key_map and spec.gate_map) and k is g
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, gate, raw_gate, vgate, scores, h0, cu_seqlens, o, residual, residual_scale,
         key_scale, mapped_key_scale, chunk_gate, *groups) = ctx.saved_tensors
        groups, scalar_inputs = groups[:3], groups[3:]
        nothing = (None,) * (17 + len(scalar_inputs))
        if do is None and dht is None:
            return nothing
        if do is None:
            do = torch.zeros(*v.shape, dtype=torch.float32, device=v.device)
        module = ChunkDiagFunction.module_for(ctx.spec)
        # o = ... + residual_scale * residual: the dv kernel computes both gradients as it
        # reads do, and adds residual's to dv where the residual is v (mamba2's D * x)
        if ctx.residual_is_v:
            residual = v
        groups = module.GroupStates(ctx.group_size, *groups) if ctx.group_size else None
        saved = module.Saved(gate, vgate, scores, ctx.saved_chunk_size, *ctx.gate_dtypes, mapped_key_scale, groups,
                             chunk_gate)
        # the cumulated gates stand in for the raw ones, whose shapes they have, except where a
        # gate map's derivative reads the raw input or the gate is per channel, and a scalar
        # map's raw tensors
        g = scalar_inputs if ctx.spec.scalar_map is not None else gate if raw_gate is None else raw_gate
        grads = module.backward(q, k, v, g, vgate, h0, cu_seqlens, do, dht, o=o, scale=ctx.scale,
                                residual=residual, residual_scale=residual_scale, key_scale=key_scale,
                                saved=saved, key_into_gate=ctx.key_into_gate, **ctx.options.as_kwargs())
        g_dtype, gv_dtype = ctx.gate_dtypes
        d_scalar_inputs = ()
        if ctx.spec.scalar_map is not None:  # the raw tensors' gradients, in their dtypes already
            d_scalar_inputs, grads = grads[3], (*grads[:3], None, *grads[4:])
        dq, dk, dv, dg, dgv, dh0, d_residual, d_residual_scale, d_key_scale = (
            None if grad is None else grad.to(dtype)
            for grad, dtype in zip(grads, (q.dtype, k.dtype, v.dtype, g_dtype, gv_dtype,
                                           *(None if t is None else t.dtype
                                             for t in (h0, residual, residual_scale, key_scale))))
        )
        return (dq, dk, dv, dg, dgv, dh0, None, None, None, None, None, None, d_residual, d_residual_scale,
                d_key_scale, None, None, *d_scalar_inputs)


def chunk_diag(q, k, v, g=None, gv=None, h0=None, cu_seqlens=None, *, exclusive: bool,
               output_final_state: bool, chunk_size: int = 64, backend: str = "triton",
               input_precision: str = "tf32", poison: bool | None = None, name: str | None = None,
               config: dict | None = None, scale: float = 1.0, out_dtype: torch.dtype | None = None,
               residual: torch.Tensor | None = None, residual_scale=None,
               key_scale: torch.Tensor | None = None, gate_map: InputMap | None = None,
               query_map: InputMap | None = None, key_map: InputMap | None = None,
               scalar_map: ScalarMap | None = None, scalar_inputs: tuple = (), decay_check=None):
    """(o, ht) of S_t = diag(exp(g_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T, o_t = q_t^T S_t
    (o_t = q_t^T S_{t-1} when `exclusive`).

    q, k: [B, T, H, K]; v: [B, T, H, V] (fp32, fp16 or bf16); g: None, [B, T, H] or
    [B, T, H, K] log gates (<= 0); gv: None or [B, T, H, V]; h0: None or [N, H, K, V];
    cu_seqlens: None or [N + 1] offsets of sequences packed along T (then B == 1).
    o is [B, T, H, V] fp32; ht is [N, H, K, V] fp32 when `output_final_state`, else None.
    Gradients flow to q, k, v, g, gv and h0.

    input_precision: tl.dot precision for fp32 inputs on a GPU ("ieee" for full fp32).
    poison: NaN-fill kernel outputs before they are written (default: ATTNC_POISON).
    name: prefix of the kernel names (default: from the structure).
    config: tuned launch values overriding the kernels' defaults (keys: the rendered module's
    TUNABLE, e.g. num_warps, block_k; runtime/autotune.py), forward and backward alike;
    the "torch" backend ignores it.
    scale, out_dtype: o = scale * q_t^T S_t, stored in out_dtype (default fp32) by the kernel
    itself: a readout's constant factor and the output's dtype, with no pass after (not
    with a V-side gate, whose gradient reads the unscaled output).
    residual, residual_scale: o += residual_scale * residual, added by the kernel as it stores
    o: a readout's term beside q^T S (mamba2's D * x). residual [B, T, H, V]; residual_scale a
    number or a tensor that broadcasts to [1, 1, H, V] (a per-head weight). Gradients flow to
    both.
    key_scale: None or [B, T, H], a per-token factor of the keys (the recurrence's k_t is
    key_scale_t * k_t; mamba2's B * delta), which the kernels apply as they load k instead
    of a pass writing the product; not with per-channel gates. Gradients flow to it.
    gate_map: None or an InputMap f: g is then a raw input x ([B, T, H, K], any float dtype)
    and the K-side log gate is f(x), which the kernels compute as they load x; the
    gradient flows to x.
    query_map, key_map: None or an InputMap f: q (k) is then a raw input x and the query
    (key) is f(x), computed by the kernels as they load x, in fp32, and rounded as q (k)
    is stored; dq (dk) is the gradient of x. Not with a V-side gate (gv), and key_map not
    with key_scale. Where k and g are one tensor with a key map and a gate map (hgrn2's
    key 1 - sigmoid(f) and log gate logsigmoid(f)), the backward adds the key's gradient
    into the gate's in its gate-gradient kernel: no pass adds the two.
    scalar_map, scalar_inputs: None and (), or a ScalarMap and its raw tensors in its order
    (scalar_map.code.tokens, each [B, T, H], then .heads, each H values in any shape, any
    float dtype): the scalar log gate (g, which is then None) and, where the map has one,
    the keys' per-token factor (key_scale, then None) are computed from them by the
    kernels; gradients flow to the raw tensors.
    decay_check: None, or a DecayCheck (runtime/kernels.py) of a scalar K-side gate: its
    cumsum kernel checks that every log gate is <= 0 and the check asserts it (DecayError;
    on a GPU a device-side assert with its message)."""
    check_backend(backend, input_precision)
    spec = kernel_spec(q, g, gv, exclusive, name, gate_map, query_map, key_map, scalar_map)
    scalar_inputs = tuple(scalar_inputs)
    if scalar_map is None and scalar_inputs:
        raise ValueError("scalar_inputs are taken only with a scalar_map")
    if scalar_map is not None:
        code = scalar_map.code
        if len(scalar_inputs) != len(code.names):
            raise ValueError(f"scalar_inputs: expected {len(code.names)} tensors ({', '.join(code.names)}), "
                             f"got {len(scalar_inputs)}")
        if code.key_scale and key_scale is not None:
            raise ValueError("key_scale: the scalar map computes the keys' factor; pass None")
    if key_map is not None and key_scale is not None:
        raise ValueError("key_map and key_scale together are not supported: fold the factor into the map "
                         "or compute the keys before the call")
    if residual is not None:
        residual_scale = _residual_scale(residual_scale, v, per_head=backend == "triton")
        residual = residual.to(q.dtype)
    if backend == "torch":
        if scalar_map is not None:
            H = q.shape[2]
            tokens = len(scalar_map.code.tokens)
            g, mapped_scale = scalar_map.torch(*(x.float() if i < tokens else x.float().reshape(H)
                                                 for i, x in enumerate(scalar_inputs)))
            g = g.expand(q.shape[:3])  # (a gate of weights alone is one value per head)
            key_scale = mapped_scale if mapped_scale is not None else key_scale
        if decay_check is not None:
            if spec.gate != "scalar":
                raise ValueError("decay_check: only a scalar K-side gate is checked by its cumsum kernel")
            checked_decays(decay_check, g)
        if key_scale is not None:
            k = (k.float() * key_scale.float()[..., None]).to(k.dtype)
        if gate_map is not None:
            g = gate_map.torch(g.float())
        if query_map is not None:
            q = query_map.torch(q.float()).to(q.dtype)
        if key_map is not None:
            k = key_map.torch(k.float()).to(k.dtype)
        o, ht = chunk_diag_torch(q, k, v, g, gv, h0, cu_seqlens, exclusive, output_final_state, chunk_size)
        o = o * scale
        if residual is not None:
            o = o + residual_scale * residual.float()
        return o.to(out_dtype or torch.float32), ht
    options = LaunchOptions.for_call(q.device, chunk_size=chunk_size, input_precision=input_precision,
                                     poison=poison, config=config)
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k, v, g, gv, h0, residual, residual_scale, key_scale, *scalar_inputs))
    return ChunkDiagFunction.apply(q, k, v, g, gv, h0, cu_seqlens, spec, output_final_state, options,
                                   float(scale), out_dtype, residual, residual_scale, key_scale, keep,
                                   decay_check, *scalar_inputs)


def _residual_scale(scale, v: torch.Tensor, *, per_head: bool = False) -> torch.Tensor:
    """A residual's scale as the kernels read it, differentiably: where `per_head` and it is
    one value per head (a [1, 1, H, 1] weight, mamba2's D), a [H] view of it in its own
    dtype (no copy, no conversion: the kernels compute in fp32); else fp32 [H, V]."""
    H, V = v.shape[2], v.shape[3]
    if not isinstance(scale, torch.Tensor) or scale.device != v.device:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=v.device)
    if per_head and scale.dim() <= 4 and (1,) * (4 - scale.dim()) + tuple(scale.shape) == (1, 1, H, 1):
        return scale.reshape(H)
    try:
        # (reshape copies the broadcast [H, V] into a new contiguous tensor)
        return scale.float().expand(1, 1, H, V).reshape(H, V).contiguous()
    except RuntimeError:
        raise ValueError(f"residual_scale of shape {tuple(scale.shape)} does not broadcast to "
                         f"[1, 1, H, V] = {(1, 1, H, V)}") from None
