"""The fused recurrent kernels of a spec as PyTorch functions: training and decode.

    recurrent(spec, bound, output_final_state=...)   any spec, with autograd: the training
                                                      path of the classes with no chunk form
    step(spec, bound, states)                         decode a few tokens against cached
                                                      fp32 states, optionally in place and
                                                      from a pool of states

Both run the module `codegen.recurrent.render_recurrent(spec)` renders, loaded once per
spec from `settings().cache_dir / "modules"`. The backward recomputes states from
checkpoints stored every `checkpoint` tokens, so what autograd keeps is the inputs,
weights and initial states plus O(T / checkpoint) states, never a state per token.
"""
from __future__ import annotations

import hashlib
from types import ModuleType
from typing import Sequence

import torch

from ..codegen.recurrent import render_recurrent
from ..dsl import ir
from .binding import Bound, stream_dtype
from .kernels import interpreted
from .loader import load_module
from .settings import settings

_MODULES: dict[ir.Spec, ModuleType] = {}


def module_for(spec: ir.Spec) -> ModuleType:
    """The rendered and imported recurrent module of `spec` (memoised per spec)."""
    module = _MODULES.get(spec)
    if module is None:
        source = render_recurrent(spec)
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        name = f"{spec.name}_recurrent_{digest}"
        config = settings()
        if config.dump_dir is not None:
            load_module(source, name, config.dump_dir)
        module = load_module(source, name, config.cache_dir / "modules")
        _MODULES[spec] = module
    return module


def register_recurrent(spec: ir.Spec, module: ModuleType) -> None:
    """Use an already loaded recurrent module (e.g. from the kernel cache) for `spec`."""
    _MODULES[spec] = module


class RecurrentFunction(torch.autograd.Function):
    """Autograd over the rendered forward / backward launchers.

    Differentiable arguments: the inputs (spec order), the weights, the initial states
    (None where absent). Saved for the backward: those tensors and the checkpoints."""

    @staticmethod
    def forward(ctx, spec, params, cu_seqlens, output_final_state, checkpoint, options, counts, *tensors):
        n_inputs, n_weights = counts
        inputs = tensors[:n_inputs]
        weights = tensors[n_inputs:n_inputs + n_weights]
        initial = tensors[n_inputs + n_weights:]
        module = module_for(spec)
        training = any(ctx.needs_input_grad[7:])
        outputs, finals, checkpoints = module.forward(
            inputs, weights, params, initial, cu_seqlens, output_final_state=output_final_state,
            checkpoint=checkpoint if training else None, output_dtype=stream_dtype(inputs), **options)
        if training:
            ctx.save_for_backward(*inputs, *weights, *initial, *checkpoints, cu_seqlens)
        ctx.spec, ctx.params, ctx.checkpoint, ctx.options = spec, params, checkpoint, options
        ctx.counts = (n_inputs, n_weights, len(initial))
        ctx.output_final_state = output_final_state
        ctx.n_outputs = len(outputs)
        ctx.set_materialize_grads(False)
        return (*outputs, *(finals or ()))

    @staticmethod
    def backward(ctx, *grads):
        n_inputs, n_weights, n_states = ctx.counts
        saved = ctx.saved_tensors
        inputs = saved[:n_inputs]
        weights = saved[n_inputs:n_inputs + n_weights]
        initial = saved[n_inputs + n_weights:n_inputs + n_weights + n_states]
        checkpoints = saved[n_inputs + n_weights + n_states:-1]
        cu_seqlens = saved[-1]
        output_grads = grads[:ctx.n_outputs]
        final_grads = grads[ctx.n_outputs:] if ctx.output_final_state else None
        nothing = (None,) * (7 + n_inputs + n_weights + n_states)
        if all(g is None for g in grads):
            return nothing
        module = module_for(ctx.spec)
        input_grads, weight_grads, initial_grads = module.backward(
            inputs, weights, ctx.params, initial, cu_seqlens, checkpoints, output_grads, final_grads,
            checkpoint=ctx.checkpoint, **ctx.options)
        input_grads = [g.to(x.dtype) for g, x in zip(input_grads, inputs)]
        weight_grads = [g.to(w.dtype) for g, w in zip(weight_grads, weights)]
        initial_grads = [None if g is None else g.to(s.dtype) for g, s in zip(initial_grads, initial)]
        return (None,) * 7 + (*input_grads, *weight_grads, *initial_grads)


def recurrent(spec: ir.Spec, bound: Bound, *, output_final_state: bool, checkpoint: int = 64,
              poison: bool | None = None, split_block: int | None = None
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """(outputs, final states or None) of `spec` on `bound`, with autograd.

    Outputs are [B, T, H, *shape] in the stream dtype (`Bound.stream_dtype`), in
    `spec.outputs` order; final states [N, H, *shape] fp32, in `spec.states` order.
    Gradients reach the inputs, weights and initial states. checkpoint: tokens between
    the states the forward keeps for the backward (memory O(T / checkpoint) states,
    recompute O(checkpoint) state tiles per program). poison: NaN-fill outputs before
    the kernels write them (default: ATTNC_POISON). split_block: force the block size
    of the split dim (tests); by default the launchers choose it."""
    if checkpoint < 1:
        raise ValueError(f"checkpoint must be a positive number of tokens, got {checkpoint}")
    if poison is None:
        poison = settings().poison
    inputs = tuple(bound.inputs[i.name] for i in spec.inputs)
    weights = tuple(bound.weights[w.name] for w in spec.weights)
    initial = bound.initial_states or (None,) * len(spec.states)
    options = dict(interpret=interpreted(bound.device), poison=poison, split_block=split_block)
    values = RecurrentFunction.apply(spec, dict(bound.params), bound.cu_seqlens, output_final_state,
                                     checkpoint, options, (len(inputs), len(weights)),
                                     *inputs, *weights, *initial)
    n = len(spec.outputs)
    outputs = tuple(values[:n])
    finals = tuple(values[n:]) if output_final_state else None
    return outputs, finals


def step(spec: ir.Spec, bound: Bound, states: torch.Tensor | Sequence[torch.Tensor], *,
         inplace: bool = False, state_indices: torch.Tensor | None = None,
         poison: bool | None = None, split_block: int | None = None
         ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Decode: run the T tokens of `bound` (typically 1..64) from cached states.

    states: one fp32 tensor per state (a single tensor for a one-state spec), [N, H,
    *shape] with N the number of sequences (B, or len(cu_seqlens) - 1), or a pool
    [P, H, *shape] when `state_indices` (int [N], distinct rows) says which row each
    sequence continues from. Returns (outputs, new states): outputs as `recurrent`;
    new states shaped like `states` (rows not picked by state_indices are unchanged).
    inplace: write the new states into `states` (which must be contiguous fp32) and
    return them; else the given tensors are left untouched. No autograd."""
    if isinstance(states, torch.Tensor):
        states = (states,)
    states = tuple(states)
    if len(states) != len(spec.states):
        raise ValueError(f"{spec.name}: expected {len(spec.states)} state tensor(s) "
                         f"({', '.join(s.name for s in spec.states)}), got {len(states)}")
    if bound.initial_states is not None:
        raise ValueError("step takes the cached states as `states`; bind without initial_state")
    N, H = bound.N, bound.H
    rows = N
    if state_indices is not None:
        if state_indices.dim() != 1 or state_indices.numel() != N or state_indices.is_floating_point():
            raise ValueError(f"state_indices: expected an integer tensor [N] = [{N}], one pool row per "
                             f"sequence, got {state_indices.dtype} of shape {list(state_indices.shape)}")
        rows = states[0].shape[0] if states else 0
        state_indices = state_indices.to(device=bound.device, dtype=torch.int64).contiguous()
    for spec_state, tensor in zip(spec.states, states):
        shape = (rows, H, *(bound.dims[d] for d in spec_state.shape))
        if state_indices is not None:
            shape = (tensor.shape[0], *shape[1:])
        if tuple(tensor.shape) != shape:
            raise ValueError(f"state {spec_state.name}: expected shape {list(shape)}, got {list(tensor.shape)}")
        if inplace and (tensor.dtype != torch.float32 or not tensor.is_contiguous()):
            raise ValueError(f"state {spec_state.name}: inplace=True needs a contiguous float32 tensor, "
                             f"got {tensor.dtype}{'' if tensor.is_contiguous() else ' (not contiguous)'}")
    if poison is None:
        poison = settings().poison
    if inplace:
        initial = finals = states
    else:
        initial = tuple(s.float().contiguous() for s in states)
        if state_indices is None:
            finals = None  # fresh [N, H, ...] tensors
        else:
            finals = tuple(s.clone() for s in initial)  # the pool with the picked rows updated
    inputs = tuple(bound.inputs.values())    # in spec order (bind keeps it)
    weights = tuple(bound.weights.values())
    # No autograd here, and no torch.no_grad() either (~2 us a step): the launcher only
    # allocates, makes inputs contiguous and launches; its outputs never require grad.
    outputs, new_states, _ = module_for(spec).forward(
        inputs, weights, bound.params, initial, bound.cu_seqlens, output_final_state=True,
        final_states=finals, state_indices=state_indices, output_dtype=stream_dtype(inputs),
        interpret=interpreted(bound.device), poison=poison, split_block=split_block)
    return outputs, new_states
