"""Chunkwise kernels for the delta-rule family.

    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = q_t^T S_t

with D_t = I (DeltaNet), exp(g_t) (Gated DeltaNet) or diag(exp(g_t)) (KDA).
`render(spec)` turns a `DeltaKernelSpec` into the source of a Python module of Triton kernels
and launchers (templates/chunk_delta.py.jinja); `chunk_delta_torch` is the same chunk
algorithm (UT form) in plain PyTorch, differentiable by autograd: the CPU path and a second
oracle. The math is /work/shared/CHUNKFORMS.md, "Delta classes".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .chunk_diag import LOG_GATE_FLOOR, floored
from .reference import L2NORM_EPS
from .templating import environment

GATE_KINDS = ("none", "scalar", "channel")

# Rows of a secondary sub-chunk (per-channel gates); must match SUB_CHUNK in the template.
SUB_CHUNK = 16



@dataclass(frozen=True)
class DeltaKernelSpec:
    """Structure of one rendered module.

    name: prefix of the kernel names (a Python identifier), e.g. "gated_delta".
    gate: the log gate g: "none" (DeltaNet), "scalar" (one per token and head, Gated
    DeltaNet) or "channel" (one per key channel, KDA).
    """

    name: str
    gate: str = "none"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"DeltaKernelSpec.name={self.name!r} is not a Python identifier; "
                             "kernel names are built from it")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"DeltaKernelSpec.gate={self.gate!r}: expected one of {', '.join(GATE_KINDS)}")


def render(spec: DeltaKernelSpec) -> str:
    """Source of a module with the forward/backward kernels and launchers for `spec`."""
    template = environment().get_template("chunk_delta.py.jinja")
    return template.render(name=spec.name, gate=spec.gate, eps=repr(L2NORM_EPS),
                           log_gate_floor=repr(LOG_GATE_FLOOR))


# ---------------------------------------------------------------------------------------
# The chunk algorithm in plain PyTorch
# ---------------------------------------------------------------------------------------

def _decay(exponent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(exponent) where `keep`, else 0. Masked exponents may be large and positive; they
    are replaced before exp (not after), so neither inf nor its gradient ever appears."""
    return torch.exp(torch.where(keep, exponent, torch.full_like(exponent, float("-inf"))))


def _causal_mask(size: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _channel_scores(x, y, b, strict):
    """P_ij = sum_c x_ic y_jc exp(b_ic - b_jc) over the causal pairs (j < i when `strict`,
    else j <= i) of each chunk; x, y, b: [..., C, K].

    16-row sub-chunks: exact exponent differences on the diagonal sub-blocks, and left of
    them factors relative to the gate of the token just before the sub-chunk, both <= 1
    (CHUNKFORMS.md, per-channel gate)."""
    C, K = x.shape[-2:]
    S = C // SUB_CHUNK
    xs, ys, bs = (t.unflatten(-2, (S, SUB_CHUNK)) for t in (x, y, b))
    sub_mask = _causal_mask(SUB_CHUNK, strict, x.device)[..., None]
    exponent = bs[..., :, None, :] - bs[..., None, :, :]                      # [..., S, i, j, K]
    diag = (xs[..., :, None, :] * ys[..., None, :, :] * _decay(exponent, sub_mask)).sum(-1)
    # place the diagonal blocks: [..., S, 16, 16] -> [..., S, 16, C]
    selector = torch.eye(C, device=x.device).view(S, SUB_CHUNK, C)
    blocks = torch.einsum("...sij,sjc->...sic", diag, selector)
    if S > 1:
        ref = bs[..., :-1, -1:, :]                                            # [..., S-1, 1, K]
        x_scaled = xs[..., 1:, :, :] * torch.exp(bs[..., 1:, :, :] - ref)
        earlier = (torch.arange(C, device=x.device)[None, :]
                   < (torch.arange(1, S, device=x.device) * SUB_CHUNK)[:, None])  # [S-1, C]
        y_scaled = y[..., None, :, :] * _decay(ref - b[..., None, :, :], earlier[..., None].expand(-1, -1, K))
        left = x_scaled @ y_scaled.transpose(-1, -2)                          # [..., S-1, 16, C]
        blocks = blocks + torch.cat([torch.zeros_like(left[..., :1, :, :]), left], dim=-3)
    return blocks.flatten(-3, -2)


def _chunk_delta_dense(q, k, v, beta, g, h0, chunk_size):
    """One batch of equal-length sequences: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T

    def chunked(x):
        # [B, T, H, D] -> [B, H, NT, C, D], zero-padded: padded gates are 0 (no decay),
        # padded betas 0 (no update)
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.view(B, NT, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta[..., None])
    strict = _causal_mask(C, True, q.device)
    causal = _causal_mask(C, False, q.device)
    if g is None:
        kk = (k @ k.transpose(-1, -2)) * strict
        qk = (q @ k.transpose(-1, -2)) * causal
        k_read, k_to_end, q_read, chunk_decay = k, k, q, None
    else:
        g = floored(g)
        b = chunked(g if g.dim() == 4 else g[..., None]).cumsum(-2)           # [B, H, NT, C, 1 | K]
        b_last = b[..., -1:, :]
        if g.dim() == 3:
            exponent = b - b.transpose(-1, -2)
            kk = (k @ k.transpose(-1, -2)) * _decay(exponent, strict)
            qk = (q @ k.transpose(-1, -2)) * _decay(exponent, causal)
            chunk_decay = torch.exp(b_last)                                    # [B, H, NT, 1, 1]
        else:
            kk = _channel_scores(k, k, b, strict=True)
            qk = _channel_scores(q, k, b, strict=False)
            chunk_decay = torch.exp(b_last).transpose(-1, -2)                  # [B, H, NT, K, 1]
        k_read, q_read = k * torch.exp(b), q * torch.exp(b)
        k_to_end = k * torch.exp(b_last - b)

    # The UT form: (I + diag(beta) L) [W U'] = diag(beta) [K^ V], unit lower triangular
    system = torch.eye(C, device=q.device) + beta * kk
    w = torch.linalg.solve_triangular(system, beta * k_read, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(system, beta * v, upper=False, unitriangular=True)

    state = h0.float() if h0 is not None else q.new_zeros(B, H, K, V)
    outputs = []
    for n in range(NT):
        new_values = u[:, :, n] - w[:, :, n] @ state
        outputs.append(q_read[:, :, n] @ state + qk[:, :, n] @ new_values)
        if chunk_decay is not None:
            state = chunk_decay[:, :, n] * state
        state = state + k_to_end[:, :, n].transpose(-1, -2) @ new_values
    o = torch.stack(outputs, dim=2)                                            # [B, H, NT, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, state


def chunk_delta_torch(q, k, v, beta, g, h0, cu_seqlens, output_final_state, chunk_size=64):
    """(o, ht): the chunk algorithm in plain PyTorch, fp32, differentiable by autograd.

    Same layout and meaning as the Triton launchers: q, k [B, T, H, K], v [B, T, H, V],
    beta [B, T, H], g None / [B, T, H] / [B, T, H, K] (log gates <= 0), h0 None /
    [N, H, K, V], cu_seqlens None / [N + 1] (then B == 1). o is [B, T, H, V] fp32,
    ht [N, H, K, V] or None."""
    if chunk_size < SUB_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}: expected a power of two >= {SUB_CHUNK}")
    if cu_seqlens is None:
        o, ht = _chunk_delta_dense(q, k, v, beta, g, h0, chunk_size)
        return o, (ht if output_final_state else None)
    if q.shape[0] != 1:
        raise ValueError(f"varlen inputs (cu_seqlens given) are packed along T with B == 1, got B = {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        def part(x):
            return None if x is None else x[:, bos:eos]
        o_n, ht_n = _chunk_delta_dense(part(q), part(k), part(v), part(beta), part(g),
                                       None if h0 is None else h0[n:n + 1], chunk_size)
        outputs.append(o_n)
        finals.append(ht_n)
    ht = torch.cat(finals) if output_final_state else None
    return torch.cat(outputs, dim=1), ht
