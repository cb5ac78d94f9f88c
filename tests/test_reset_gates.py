"""Log gates far below the others: tokens that reset the state (a decay of e^-1e6, or
exactly 0). The chunk forms take every decay as a difference of in-chunk fp32 sums of log
gates; one token at -1e6 used to leave the sums after it without the digits of the other
gates (1e-2 to 5e-2 errors in the outputs of every gated shipped spec, 0.4 in rwkv6's dw).
The kernels and the PyTorch paths now read each log gate at LOG_GATE_FLOOR or above
(codegen/chunk_diag.py), and pass no gradient through a gate below it where they compute
the gate themselves (gate maps, scalar maps, a prologue).

Values, final states and every gradient against the fp64 recurrence, on both backends
(the Triton kernels in the interpreter off a GPU), with resets inside a chunk, on
neighbouring tokens and on both sides of a chunk boundary.
"""
import pytest
import torch

import attnc
from attnc.codegen.chunk_diag import LOG_GATE_FLOOR, floored
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import verify
from test_decay_checks import CHANNEL

# a per-channel gate of two inputs, which no kernel maps: the prologue computes it, and the
# derivative of its map in w is the log gate itself (-1e6 at a reset)
TWO_INPUT_GATE = """
attention two_input_gate
  dims    K, V
  inputs  q[K], k[K], v[V], w[K], c

  gate    a = exp(-exp(w) * sigmoid(c))
  state   S[K, V]
  decay   S = diag(a) @ S
  update  S = S + outer(k, v)
  readout o = q @ S
end
"""

# a per-channel log gate passed as it is (no map) to the diagonal kernels
CHANNEL_INPUT_GATE = CHANNEL

RESET_TOKENS = (3, 40, 41, 63, 64, 70)   # chunks of 64 tokens: 63 and 64 straddle a boundary

# (spec, gate input, its value at a reset token): each a log gate of about -1e6 or -inf
RESETS = [
    ("gla", "g", -1.6e7),                 # logsigmoid(g) / 16, a gate map
    ("rwkv6", "w", 13.8),                 # -exp(w), a gate map whose derivative is -1e6
    ("hgrn2", "f", -1e6),                 # logsigmoid(f), the key 1 - sigmoid(f) beside it
    ("mamba2", "dt", 150.0),              # -exp(A_log) softplus(dt + dt_bias), a scalar map
    ("retnet", "log_gamma", -1e6),        # a per-head weight, a scalar map: every token of head 0
    ("gated_deltanet", "alpha", -1e6),    # an input, a scalar gate
    ("kda", "g", -1e6),                   # an input, a per-channel gate
    (TWO_INPUT_GATE, "w", 14.0),          # a prologue's
    (CHANNEL_INPUT_GATE, "g", -1e6),
    # a decay of exactly 0
    ("gated_deltanet", "alpha", float("-inf")),
    ("kda", "g", float("-inf")),
    ("hgrn2", "f", float("-inf")),
    ("gla", "g", float("-inf")),
    (CHANNEL_INPUT_GATE, "g", float("-inf")),
]


def _op(spec):
    return attnc.compile(spec) if "\n" in spec else attnc.load(spec)


def _case_id(case):
    spec, name, value = case
    return f"{_op(spec).name}-{name}={value:g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", RESETS, ids=_case_id)
def test_reset_tokens_match_the_recurrence(case, backend):
    spec, name, value = case
    op = _op(spec)
    B, T, H, K, V = 2, 100, 2, 16, 16
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims={"K": K, "V": V}, dtype=torch.float32,
                            device="cpu", generator=torch.Generator().manual_seed(1))
    if args[name].dim() == 1:   # a per-head weight
        args[name][0] = value
    else:
        for t in RESET_TOKENS:
            args[name][:, t] = value
    result = verify(op, B=B, T=T, H=H, K=K, V=V, arguments=args, backend=backend, seed=1)
    assert result.ok, result.errors


def test_the_floor_keeps_nan_and_takes_minus_infinity():
    g = torch.tensor([0.0, -5.0, -1e6, float("-inf"), float("nan")], requires_grad=True)
    low = floored(g)
    assert low[:3].tolist() == [0.0, -5.0, LOG_GATE_FLOOR]
    assert low[3].item() == LOG_GATE_FLOOR and low[4].isnan()
    low[:4].sum().backward()
    assert g.grad[:4].tolist() == [1.0, 1.0, 0.0, 0.0]
    # exp of the floor is 0 in fp32: a decay across a token at the floor is 0, as its own
    assert torch.exp(torch.tensor(LOG_GATE_FLOOR)).item() == 0.0
