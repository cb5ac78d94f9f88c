"""The same checks on a CUDA GPU at realistic sizes (compiled Triton, not the
interpreter). Skipped, saying so, on machines without CUDA."""
import pytest
import torch

import attnc
from attnc.runtime.verify import verify

from conftest import gpu  # noqa: E402

pytestmark = [gpu, pytest.mark.gpu]

DIAGONAL_SPECS = ["linear_attn", "retnet", "mamba2", "gla", "hgrn2", "rwkv6"]


@pytest.mark.parametrize("name", DIAGONAL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_diagonal_family_realistic(name, dtype):
    result = verify(attnc.load(name), B=2, T=1000, H=4, K=128, V=128, dtype=dtype, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gla", "mamba2"])
@pytest.mark.parametrize("kv", [(64, 128), (256, 256), (48, 96)], ids=str)
def test_head_dims(name, kv):
    K, V = kv
    result = verify(attnc.load(name), B=1, T=333, H=2, K=K, V=V, device="cuda")
    assert result.ok, result.errors


@pytest.mark.parametrize("name", ["gla", "rwkv6"])
def test_varlen_and_gqa(name):
    op = attnc.load(name)
    result = verify(op, H=4, K=128, V=128, seqlens=[700, 3, 1300], device="cuda",
                    dtype=torch.bfloat16,
                    heads={i.name: 2 for i in op.spec.inputs if i.shape == ("K",)})
    assert result.ok, result.errors
