"""Decode steps for every spec, and training of the specs with no chunk form, through
the compiled op (`op.step`, `op(...)`): the fused recurrent kernels."""
import warnings

import pytest
import torch

import attnc
from attnc.runtime.compiler import NotChunkParallelWarning
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms, verify

ALL = sorted(attnc.shipped_specs())


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotChunkParallelWarning)
        return attnc.load(name)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _tokens(op, args, start, stop):
    """The arguments for tokens start..stop: inputs sliced along T, weights whole."""
    inputs = {i.name for i in op.spec.inputs}
    return {n: t[:, start:stop] if n in inputs else t for n, t in args.items()}


@pytest.mark.parametrize("block", [1, 5])
@pytest.mark.parametrize("name", ALL)
def test_step_continues_the_sequence(name, block):
    """Decoding token by token (or 5 at a time) from the op's state reproduces the
    full-sequence op: outputs and final state."""
    op = _load(name)
    B, T, H = 2, 12, 2
    gen = torch.Generator().manual_seed(7)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims={"K": 16, "V": 16}, generator=gen)
    h0 = tuple(torch.randn(B, H, 16, 16, generator=gen) for _ in op.spec.states)
    init = h0[0] if len(h0) == 1 else h0
    full, final = op(**args, initial_state=init, output_final_state=True)
    state = tuple(s.clone() for s in h0)
    pieces = []
    for start in range(0, T, block):
        out, state = op.step(**_tokens(op, args, start, start + block),
                             state=state[0] if len(state) == 1 else state)
        state = _tuple(state)
        pieces.append(_tuple(out))
    for i, whole in enumerate(_tuple(full)):
        stepped = torch.cat([p[i] for p in pieces], dim=1)
        assert rel_rms(stepped, whole) <= 1e-4, (name, i)
    for s, f in zip(state, _tuple(final)):
        assert rel_rms(s, f) <= 1e-4, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_in_place_from_a_state_pool(backend):
    op = _load("gated_deltanet")
    gen = torch.Generator().manual_seed(8)
    args = random_arguments(op.analysis, B=2, T=1, H=2, dims={"K": 16, "V": 16}, generator=gen)
    pool = torch.randn(5, 2, 16, 16, generator=gen)
    rows = torch.tensor([3, 1])
    expected, expected_state = op.step(**args, state=pool[rows].clone(), backend=backend)
    before = pool.clone()
    out, new_pool = op.step(**args, state=pool, state_indices=rows, inplace=True, backend=backend)
    assert new_pool.data_ptr() == pool.data_ptr()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(pool[rows], expected_state)
    untouched = torch.tensor([0, 2, 4])
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("name", ["mamba1", "rwkv7"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_specs_without_chunk_form_train(name, backend):
    result = verify(_load(name), B=1, T=33, H=2, K=16, V=16, backend=backend)
    assert result.ok, result.errors


def test_compile_warns_when_not_chunk_parallel():
    with pytest.warns(NotChunkParallelWarning, match="elementwise over the whole"):
        attnc.load("mamba1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotChunkParallelWarning)
        attnc.load("gla")  # chunk-parallel: no warning
