"""Chunkwise kernels for the diagonal-transition family.

    S_t = diag(exp(g_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T,   o_t = q_t^T S_t  (or S_{t-1})

`render(spec)` turns a `DiagKernelSpec` into the source of a Python module of Triton kernels
and launchers (templates/chunk_diag.py.jinja); `chunk_diag_torch` is the same chunk algorithm
in plain PyTorch, differentiable by autograd: the CPU path and a second oracle.
The math is /work/shared/CHUNKFORMS.md, "Diagonal classes".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .templating import environment

GATE_KINDS = ("none", "scalar", "channel")

# Rows of a secondary sub-chunk (per-channel gates); must match SUB_CHUNK in the template.
SUB_CHUNK = 16

# The chunk forms (both families, kernels and the PyTorch paths below) read every log gate
# as max(g, LOG_GATE_FLOOR). Each decay they take is a difference of in-chunk fp32 sums of
# log gates, and a token far below the others (a reset, g = -1e6) leaves the sums after it
# without the digits of the ordinary gates: one such token gave hgrn2's outputs 1.5e-2
# relative errors, and a few gave every gated shipped spec 1e-2 to 5e-2. exp(-110) ~ 1.7e-48
# is 0 in fp32 (below half the smallest subnormal, e^-103.97), so every decay across a
# token at the floor is still exactly 0, as with its own gate, and the sums stay small: a
# chunk of 64 tokens at the floor reaches -7040, where fp32 keeps 5e-4 of a decay's
# exponent. Below the floor a log gate's gradient is 0 (a clamp's) where the kernels
# compute the gate from a raw input (gate_map, scalar_map) and in the PyTorch paths; a gate
# passed as it is takes the chunk forms' gradient, which no decay across the token feeds.
LOG_GATE_FLOOR = -110.0


def floored(g: torch.Tensor | None) -> torch.Tensor | None:
    """g read as the chunk forms read log gates: max(g, LOG_GATE_FLOOR), NaN kept."""
    return None if g is None else g.clamp_min(LOG_GATE_FLOOR)


@dataclass(frozen=True)
class ScalarMapCode:
    """A scalar log gate, and the keys' per-token factor beside it, as functions of raw
    tensors, in Triton code: mamba2's log gate -exp(A_log) softplus(dt + dt_bias) and key
    factor softplus(dt + dt_bias) of the per-token input dt and the per-head weights A_log
    and dt_bias. The cumsum kernel computes both as it loads the raw tensors and the gate
    gradient kernel applies the chain rule, so no pass writes them or reads their gradients
    (codegen/plan.py, ChunkCall.scalar_inputs).

    tokens: the per-token scalar inputs, [B, T, H], loaded as `b_<name>` rows;
    heads: the per-head weights, [H], loaded as `w_<name>` scalars;
    log_gate, key_scale: Triton code of each in those names ("" for no key factor);
    grads: Triton code of each raw tensor's gradient (tokens, then heads) in those names and
    `cot_gate`, `cot_scale`, the gradients of the log gate and of the key factor."""

    tokens: tuple[str, ...]
    heads: tuple[str, ...]
    log_gate: str
    key_scale: str
    grads: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.tokens + self.heads

    def check(self) -> None:
        names = self.names
        if not names or len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            raise ValueError(f"ScalarMapCode: tokens {self.tokens} and heads {self.heads} must be distinct "
                             "identifiers, at least one")
        if not self.log_gate or len(self.grads) != len(names):
            raise ValueError("ScalarMapCode: a log gate's code and one gradient per raw tensor are needed")


@dataclass(frozen=True)
class DiagKernelSpec:
    """Structure of one rendered module.

    name: prefix of the kernel names (a Python identifier), e.g. "gla".
    gate: the K-side log gate g: "none", "scalar" (one per token and head) or "channel".
    vgate: whether a per-channel V-side log gate gv exists.
    exclusive: read out before the update, o_t = q_t^T S_{t-1}.
    gate_map, gate_map_grad: "" or, with a per-channel gate, Triton code of the log gate as
    a function of `x`, the raw input the launchers then take as g, and of its derivative
    (gla: "_logsigmoid(x) / 16.0", "_sigmoid(-x) / 16.0"). The kernels map g as they load
    it, so no pass writes the log gate (codegen/plan.py, ChunkCall.gate_input).
    query_map, query_map_grad, key_map, key_map_grad: "" or, with no V-side gate, Triton
    code of the query (key) as a function of `x`, the raw input the launchers then take as
    q (k), and of its derivative (linear_attn: "1.0 + _elu(x)"; hgrn2's key beside its
    per-channel gate: "1.0 - _sigmoid(x)"). The kernels map q (k) as they load it and
    multiply dq (dk) by the derivative as they store it, so no pass writes the feature map
    or reads its gradient (ChunkCall.query_input / key_input).
    scalar_map: None or, with a scalar gate and no V-side gate, a ScalarMapCode: the
    launchers then take the raw tensors it names as g (a tuple) and compute the log gate
    and the keys' factor from them.
    """

    name: str
    gate: str = "none"
    vgate: bool = False
    exclusive: bool = False
    gate_map: str = ""
    gate_map_grad: str = ""
    query_map: str = ""
    query_map_grad: str = ""
    key_map: str = ""
    key_map_grad: str = ""
    scalar_map: ScalarMapCode | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"DiagKernelSpec.name={self.name!r} is not a Python identifier; "
                             "kernel names are built from it")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"DiagKernelSpec.gate={self.gate!r}: expected one of {', '.join(GATE_KINDS)}")
        if not isinstance(self.vgate, bool) or not isinstance(self.exclusive, bool):
            raise ValueError("DiagKernelSpec.vgate and .exclusive must be bools")
        if not isinstance(self.gate_map, str) or not isinstance(self.gate_map_grad, str) \
                or bool(self.gate_map) != bool(self.gate_map_grad):
            raise ValueError("DiagKernelSpec.gate_map and .gate_map_grad: both Triton code of `x`, or both empty")
        if self.gate_map and self.gate != "channel":
            raise ValueError(f"DiagKernelSpec.gate_map is for per-channel gates; gate={self.gate!r}")
        for role in ("query", "key"):
            f, grad = getattr(self, f"{role}_map"), getattr(self, f"{role}_map_grad")
            if not isinstance(f, str) or not isinstance(grad, str) or bool(f) != bool(grad):
                raise ValueError(f"DiagKernelSpec.{role}_map and .{role}_map_grad: both Triton code of `x`, "
                                 "or both empty")
            if f and self.vgate:
                raise ValueError(f"DiagKernelSpec.{role}_map is not taken with a V-side gate (vgate=True)")
        if self.scalar_map is not None:
            if not isinstance(self.scalar_map, ScalarMapCode):
                raise ValueError("DiagKernelSpec.scalar_map must be a ScalarMapCode or None")
            if self.gate != "scalar" or self.vgate:
                raise ValueError("DiagKernelSpec.scalar_map is for a scalar gate without a V-side gate; "
                                 f"gate={self.gate!r}, vgate={self.vgate}")
            self.scalar_map.check()


def render(spec: DiagKernelSpec) -> str:
    """Source of a module with the forward/backward kernels and launchers for `spec`."""
    template = environment().get_template("chunk_diag.py.jinja")
    return template.render(name=spec.name, gate=spec.gate, vgate=spec.vgate, exclusive=spec.exclusive,
                           gate_map=spec.gate_map, gate_map_grad=spec.gate_map_grad,
                           query_map=spec.query_map, query_map_grad=spec.query_map_grad,
                           key_map=spec.key_map, key_map_grad=spec.key_map_grad,
                           scalar_map=spec.scalar_map, log_gate_floor=repr(LOG_GATE_FLOOR))


# ---------------------------------------------------------------------------------------
# The chunk algorithm in plain PyTorch
# ---------------------------------------------------------------------------------------

def _decay(exponent: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """exp(exponent) where `keep`, else 0. Masked exponents may be large and positive; they
    are replaced before exp (not after), so neither inf nor its gradient ever appears."""
    if keep is None:
        return torch.exp(exponent)
    return torch.exp(torch.where(keep, exponent, torch.full_like(exponent, float("-inf"))))


def _read_gate(cumulated: torch.Tensor, exclusive: bool) -> torch.Tensor:
    """Cumulated gate at which each token reads the state: b_i, or b_{i-1} (0 for the first
    token of a chunk) when reading before the update. Shifting the cumsum, rather than
    subtracting g, keeps b_{i-1} - b_{i-1} exactly 0 for strong gates."""
    if not exclusive:
        return cumulated
    return torch.nn.functional.pad(cumulated[..., :-1, :], (0, 0, 1, 0))


def _causal_mask(size: int, exclusive: bool, device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril(-1 if exclusive else 0)


def _sub_chunk_selector(chunk: int, device) -> torch.Tensor:
    """[chunk / 16, 16, chunk] one-hot placing column j of sub-chunk s at position 16 s + j."""
    eye = torch.eye(chunk, device=device)
    return eye.view(chunk // SUB_CHUNK, SUB_CHUNK, chunk)


def _gated_scores(x, y, read, write, exclusive):
    """P_ij = sum_c x_ic y_jc exp(read_ic - write_jc) over the causal pairs of each chunk.

    x, y: [..., C, D]; read, write: [..., C, D] (per channel), [..., C, 1] (scalar) or None.
    Per-channel gates use 16-row sub-chunks: relative to a reference gate off the diagonal,
    exact on the diagonal sub-blocks (CHUNKFORMS.md)."""
    C = x.shape[-2]
    mask = _causal_mask(C, exclusive, x.device)
    if read is None:
        return (x @ y.transpose(-1, -2)) * mask
    if read.shape[-1] == 1:
        exponent = read - write.transpose(-1, -2)
        return (x @ y.transpose(-1, -2)) * _decay(exponent, mask)
    D = x.shape[-1]
    S = C // SUB_CHUNK
    xs = x.unflatten(-2, (S, SUB_CHUNK))
    ys = y.unflatten(-2, (S, SUB_CHUNK))
    read_s = read.unflatten(-2, (S, SUB_CHUNK))
    write_s = write.unflatten(-2, (S, SUB_CHUNK))
    # diagonal sub-blocks [..., S, i, j], exact
    sub_mask = _causal_mask(SUB_CHUNK, exclusive, x.device)[..., None]
    exponent = read_s[..., :, None, :] - write_s[..., None, :, :]
    diag = (xs[..., :, None, :] * ys[..., None, :, :] * _decay(exponent, sub_mask)).sum(-1)
    blocks = torch.einsum("...sij,sjc->...sic", diag, _sub_chunk_selector(C, x.device))
    if S > 1:
        # sub-chunk s >= 1 against all earlier columns, relative to the write gate of the
        # token just before it: both factors <= 1
        ref = write_s[..., :-1, -1:, :]                                   # [..., S-1, 1, D]
        x_scaled = xs[..., 1:, :, :] * torch.exp(read_s[..., 1:, :, :] - ref)
        earlier = (torch.arange(C, device=x.device)[None, :]
                   < (torch.arange(1, S, device=x.device) * SUB_CHUNK)[:, None])  # [S-1, C]
        y_scaled = y[..., None, :, :] * _decay(ref - write[..., None, :, :], earlier[..., None].expand(-1, -1, D))
        left = x_scaled @ y_scaled.transpose(-1, -2)                      # [..., S-1, 16, C]
        blocks = blocks + torch.cat([torch.zeros_like(left[..., :1, :, :]), left], dim=-3)
    return blocks.flatten(-3, -2)


def _gated_apply(scores, w, read, write, exclusive):
    """Z_i = sum_{j<=i} P_ij exp(read_i - write_j) w_j with a per-channel gate on w's
    channels (or none): the V-side mirror of _gated_scores."""
    if read is None:
        return scores @ w
    C = w.shape[-2]
    D = w.shape[-1]
    S = C // SUB_CHUNK
    scores_s = scores.unflatten(-2, (S, SUB_CHUNK))                       # [..., S, 16, C]
    ws = w.unflatten(-2, (S, SUB_CHUNK))
    read_s = read.unflatten(-2, (S, SUB_CHUNK))
    write_s = write.unflatten(-2, (S, SUB_CHUNK))
    diag_scores = torch.einsum("...sic,sjc->...sij", scores_s, _sub_chunk_selector(C, w.device))
    sub_mask = _causal_mask(SUB_CHUNK, exclusive, w.device)[..., None]
    exponent = read_s[..., :, None, :] - write_s[..., None, :, :]
    out = (diag_scores[..., None] * _decay(exponent, sub_mask) * ws[..., None, :, :]).sum(-2)
    if S > 1:
        ref = write_s[..., :-1, -1:, :]
        earlier = (torch.arange(C, device=w.device)[None, :]
                   < (torch.arange(1, S, device=w.device) * SUB_CHUNK)[:, None])
        w_scaled = w[..., None, :, :] * _decay(ref - write[..., None, :, :], earlier[..., None].expand(-1, -1, D))
        left_scores = scores_s[..., 1:, :, :] * earlier[:, None, :]
        left = torch.exp(read_s[..., 1:, :, :] - ref) * (left_scores @ w_scaled)
        out = out + torch.cat([torch.zeros_like(left[..., :1, :, :]), left], dim=-3)
    return out.flatten(-3, -2)


def _chunk_diag_dense(q, k, v, g, gv, h0, exclusive, chunk_size):
    """One batch of equal-length sequences: q, k [B, T, H, K], v [B, T, H, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    if NT == 0:  # an empty sequence in a varlen batch: nothing read, the state passes through
        state = h0.float() if h0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
        return q.new_zeros(B, 0, H, V, dtype=torch.float32), state

    def chunked(x):
        # [B, T, H, D] -> [B, H, NT, C, D], zero-padded: padded gates are 0 (no decay)
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.view(B, NT, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = chunked(q), chunked(k), chunked(v)
    g, gv = floored(g), floored(gv)
    write = chunked(g if g.dim() == 4 else g[..., None]).cumsum(-2) if g is not None else None
    vwrite = chunked(gv).cumsum(-2) if gv is not None else None
    read = _read_gate(write, exclusive) if write is not None else None
    vread = _read_gate(vwrite, exclusive) if vwrite is not None else None

    # chunk states: S' = exp(b_C) S exp(c_C) + (K exp(b_C - b))^T (V exp(c_C - c))
    k_written, v_written = k, v
    if write is not None:
        k_written = k * torch.exp(write[..., -1:, :] - write)
    if vwrite is not None:
        v_written = v * torch.exp(vwrite[..., -1:, :] - vwrite)
    updates = k_written.transpose(-1, -2) @ v_written                     # [B, H, NT, K, V]
    state = h0.float() if h0 is not None else q.new_zeros(B, H, K, V)
    entering = []
    for n in range(NT):
        entering.append(state)
        if write is not None:
            state = state * torch.exp(write[:, :, n, -1, :, None])
        if vwrite is not None:
            state = state * torch.exp(vwrite[:, :, n, -1, None, :])
        state = state + updates[:, :, n]
    states = torch.stack(entering, dim=2)                                  # [B, H, NT, K, V]

    q_read = q * torch.exp(read) if read is not None else q
    o = q_read @ states
    if vread is not None:
        o = o * torch.exp(vread)
    scores = _gated_scores(q, k, read, write, exclusive)
    o = o + _gated_apply(scores, v, vread, vwrite, exclusive)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, state


def chunk_diag_torch(q, k, v, g, gv, h0, cu_seqlens, exclusive, output_final_state, chunk_size=64):
    """(o, ht): the chunk algorithm in plain PyTorch, fp32, differentiable by autograd.

    Same layout and meaning as the Triton launchers: q, k [B, T, H, K], v [B, T, H, V],
    g None / [B, T, H] / [B, T, H, K], gv None / [B, T, H, V], h0 None / [N, H, K, V],
    cu_seqlens None / [N + 1] (then B == 1). o is [B, T, H, V] fp32, ht [N, H, K, V] or None."""
    if chunk_size < SUB_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}: expected a power of two >= {SUB_CHUNK}")
    if cu_seqlens is None:
        o, ht = _chunk_diag_dense(q, k, v, g, gv, h0, exclusive, chunk_size)
        return o, (ht if output_final_state else None)
    if q.shape[0] != 1:
        raise ValueError(f"varlen inputs (cu_seqlens given) are packed along T with B == 1, got B = {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        def part(x):
            return None if x is None else x[:, bos:eos]
        o_n, ht_n = _chunk_diag_dense(part(q), part(k), part(v), part(g), part(gv),
                                      None if h0 is None else h0[n:n + 1], exclusive, chunk_size)
        outputs.append(o_n)
        finals.append(ht_n)
    ht = torch.cat(finals) if output_final_state else None
    return torch.cat(outputs, dim=1), ht
