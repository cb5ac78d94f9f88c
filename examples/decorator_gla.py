"""Gated Linear Attention written as a Python function instead of a `.attn` file.

    python examples/decorator_gla.py

`@attnc.recurrence` traces the function once into the same IR that `specs/gla.attn`
parses to, and returns the same kind of compiled op as `attnc.compile`.
"""
import torch

import attnc
from attnc import K, V, Param, State, Vec, diag, exp, logsigmoid, outer


@attnc.recurrence
def gla(q: Vec[K], k: Vec[K], v: Vec[V], g: Vec[K], S: State[K, V], scale: Param = K ** -0.5):
    """Gated Linear Attention: Yang, Wang, Shen, Panda, Kim 2023 (per-channel gate, tau = 16)."""
    q = q * scale                               # feature q
    a = attnc.gate(exp(logsigmoid(g) / 16))     # gate    a
    S = attnc.decay(diag(a) @ S)                # decay   S
    S = S + outer(k, v)                         # update  S
    return q @ S                                # readout o


def main() -> None:
    print(gla)                   # <attnc op gla: class diagonal>
    print(attnc.to_spec(gla))    # the equivalent .attn text
    assert gla.spec == attnc.load("gla").spec, "the twin of specs/gla.attn"

    B, T, H, head_k, head_v = 2, 100, 4, 32, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    q, k, g = (torch.randn(B, T, H, head_k, generator=generator).to(device) for _ in range(3))
    v = torch.randn(B, T, H, head_v, generator=generator).to(device)

    expected, _ = gla.reference(q=q, k=k, v=v, g=g)   # fp64 sequential recurrence
    output, _ = gla(q=q, k=k, v=v, g=g)   # chunkwise: Triton on CUDA, its PyTorch twin on CPU
    error = (output.double() - expected).abs().max().item()
    print(f"{device} kernels vs fp64 reference: max abs error {error:.2e} "
          f"(output magnitude {expected.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
