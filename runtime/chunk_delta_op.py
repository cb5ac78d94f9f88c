"""`chunk_delta`: the delta-rule recurrence as a differentiable PyTorch op.

    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = q_t^T S_t

with D_t = I, exp(g_t) or diag(exp(g_t)) (DeltaNet, Gated DeltaNet, KDA). backend="triton"
runs kernels rendered from codegen/templates/chunk_delta.py.jinja for the gate of the call;
backend="torch" runs the same chunk algorithm in plain PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnc.codegen.chunk_delta import DeltaKernelSpec, chunk_delta_torch, render
from attnc.runtime.loader import load_module
from attnc.runtime.settings import settings

BACKENDS = ("triton", "torch")
DOT_PRECISIONS = ("tf32", "tf32x3", "ieee")


def gate_kind(q: torch.Tensor, g: torch.Tensor | None) -> str:
    """"none", "scalar" or "channel", from the shape of the log gate."""
    if g is None:
        return "none"
    if tuple(g.shape) == tuple(q.shape[:3]):
        return "scalar"
    if tuple(g.shape) == tuple(q.shape):
        return "channel"
    raise ValueError(f"g has shape {tuple(g.shape)}; expected [B, T, H] = {tuple(q.shape[:3])} for a scalar "
                     f"gate or [B, T, H, K] = {tuple(q.shape)} for a per-channel gate")


@dataclass(frozen=True)
class LaunchOptions:
    """How the rendered launchers run: chunk size, tl.dot precision for fp32 operands,
    interpreter mode (fp32 dots), NaN-poisoned buffers (tests) and a tuned config."""

    chunk_size: int = 64
    input_precision: str = "tf32"
    interpret: bool = False
    poison: bool = False
    # tuned overrides of the launchers' defaults (the module's TUNABLE keys), as sorted
    # (key, value) pairs so that options stay hashable; () runs the defaults
    config: tuple[tuple[str, int], ...] = ()

    def as_kwargs(self) -> dict:
        return dict(chunk_size=self.chunk_size, interpret=self.interpret,
                    input_precision=self.input_precision, poison=self.poison,
                    config=dict(self.config) or None)


class ChunkDeltaFunction(torch.autograd.Function):
    """Autograd over the rendered module's forward and backward launchers. Saves only the
    inputs: the backward recomputes scores, inverse, W, U' and chunk states."""

    # rendered and imported modules, one per DeltaKernelSpec
    modules: dict[DeltaKernelSpec, object] = {}

    @classmethod
    def module_for(cls, spec: DeltaKernelSpec):
        module = cls.modules.get(spec)
        if module is None:
            source = render(spec)
            # one file per structure: the same name with another gate is another module
            module_name = f"{spec.name}_{spec.gate}"
            config = settings()
            if config.dump_dir is not None:
                load_module(source, module_name, config.dump_dir)
            module = load_module(source, module_name, config.cache_dir / "modules")
            cls.modules[spec] = module
        return module

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, cu_seqlens, spec, output_final_state, options):
        module = ChunkDeltaFunction.module_for(spec)
        o, ht = module.forward(q, k, v, beta, g, h0, cu_seqlens, output_final_state, **options.as_kwargs())
        ctx.save_for_backward(q, k, v, beta, g, h0, cu_seqlens)
        ctx.spec = spec
        ctx.options = options
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, cu_seqlens = ctx.saved_tensors
        nothing = (None,) * 10
        if do is None and dht is None:
            return nothing
        if do is None:
            do = torch.zeros(*v.shape, dtype=torch.float32, device=v.device)
        module = ChunkDeltaFunction.module_for(ctx.spec)
        grads = module.backward(q, k, v, beta, g, h0, cu_seqlens, do, dht, **ctx.options.as_kwargs())
        dq, dk, dv, dbeta, dg, dh0 = (
            None if grad is None else grad.to(like.dtype)
            for grad, like in zip(grads, (q, k, v, beta, g, h0))
        )
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None


def chunk_delta(q, k, v, beta, g=None, h0=None, cu_seqlens=None, *, output_final_state: bool,
                chunk_size: int = 64, backend: str = "triton", name: str = "delta",
                input_precision: str = "tf32", poison: bool = False, config: dict | None = None):
    """(o, ht) of S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T, o_t = q_t^T S_t.

    q, k: [B, T, H, K]; v: [B, T, H, V] (fp32, fp16 or bf16; scale folded into q, keys
    l2-normalised by the caller); beta: [B, T, H]; g: None (D_t = I), [B, T, H] (scalar
    decay exp(g_t)) or [B, T, H, K] (per-channel decay) log gates <= 0; h0: None or
    [N, H, K, V]; cu_seqlens: None or [N + 1] offsets of sequences packed along T (then B == 1).
    o is [B, T, H, V] fp32; ht is [N, H, K, V] fp32 when `output_final_state`, else None.
    Gradients flow to q, k, v, beta, g and h0.

    name: prefix of the generated kernels. input_precision: tl.dot precision for fp32 inputs
    on a GPU ("ieee" for full fp32). poison: NaN-fill kernel buffers before they are written.
    config: tuned launch values overriding the kernels' defaults (keys: the rendered module's
    TUNABLE, e.g. num_warps, block_k; runtime/autotune.py), forward and backward alike;
    the "torch" backend ignores it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if input_precision not in DOT_PRECISIONS:
        raise ValueError(f"input_precision={input_precision!r}: expected one of {', '.join(DOT_PRECISIONS)}")
    spec = DeltaKernelSpec(name=name, gate=gate_kind(q, g))
    if backend == "torch":
        return chunk_delta_torch(q, k, v, beta, g, h0, cu_seqlens, output_final_state, chunk_size)
    interpret = settings().interpret or q.device.type != "cuda"
    options = LaunchOptions(chunk_size=chunk_size, input_precision=input_precision,
                            interpret=interpret, poison=poison, config=tuple(sorted((config or {}).items())))
    return ChunkDeltaFunction.apply(q, k, v, beta, g, h0, cu_seqlens, spec, output_final_state, options)
