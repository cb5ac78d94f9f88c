"""Ops inside torch.compile: a call is not traced but runs as it does eagerly, a graph
break around it, so a compiled model computes what the eager one does, gradients included."""
import pytest
import torch

import attnc
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms


def _arguments(op, seed, B=1, T=40, H=2):
    gen = torch.Generator().manual_seed(seed)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims={d.name: 16 for d in op.spec.dims}, generator=gen)
    return {n: t.requires_grad_() for n, t in args.items()}


def _grads(args):
    grads = {n: t.grad.clone() for n, t in args.items()}
    for t in args.values():
        t.grad = None
    return grads


@pytest.mark.parametrize("name", ["gla", "gated_deltanet"])
def test_compiled_model_matches_eager(name):
    """torch.compile (aot_eager: the graph around the op runs the same aten ops) of a
    function that calls the op: the same outputs and gradients as eager, bit for bit,
    and both the fp64 reference's."""
    op = attnc.load(name)
    args = _arguments(op, seed=3)

    def model(**a):
        out, final = op(**a, output_final_state=True, backend="triton")
        return torch.tanh(out) * 2, final

    eager, eager_final = model(**args)
    (eager.sum() + eager_final.square().sum()).backward()
    expected = _grads(args)

    compiled, compiled_final = torch.compile(model, backend="aot_eager")(**args)
    (compiled.sum() + compiled_final.square().sum()).backward()
    got = _grads(args)

    assert torch.equal(compiled, eager) and torch.equal(compiled_final, eager_final)
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    reference, _ = op(**{n: t.detach().double() for n, t in args.items()}, output_final_state=True,
                      backend="torch")
    assert rel_rms(compiled, torch.tanh(reference) * 2) <= 1e-4


def test_compiled_decode_step_updates_the_state_pool():
    """op.step inside torch.compile, in place on a state pool: the outputs and the pool
    are what the eager step leaves."""
    op = attnc.load("gla")
    B, H, P = 3, 2, 5
    args = {n: t.detach() for n, t in _arguments(op, seed=4, B=B, T=1, H=H).items()}
    pool = torch.randn(P, H, 16, 16, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([4, 0, 2])

    def decode(state, **a):
        out, _ = op.step(**a, state=state, state_indices=rows, inplace=True, backend="triton")
        return out + 1

    eager_pool, compiled_pool = pool.clone(), pool.clone()
    eager = decode(eager_pool, **args)
    compiled = torch.compile(decode, backend="aot_eager")(compiled_pool, **args)
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_pool, eager_pool)
    assert not torch.equal(compiled_pool[rows], pool[rows])
    assert torch.equal(compiled_pool[[1, 3]], pool[[1, 3]])
