"""Calls run on their inputs' device: Triton launches on the current CUDA device, so a call
whose inputs live on another GPU makes theirs current (`runtime/op.py: _on_device`). Checked
here without a GPU by what the guard chooses and that every call goes through it; with two
GPUs, `tests/test_gpu.py::test_inputs_on_a_gpu_that_is_not_the_current_one` runs it."""
import contextlib

import torch

import attnc
from attnc.runtime import op as op_module
from attnc.runtime.sampling import random_arguments


def test_the_guard_switches_only_to_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    switch = op_module._on_device(torch.device("cuda", 1))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1
    for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        assert isinstance(op_module._on_device(device), contextlib.nullcontext), device


def test_calls_and_steps_run_under_the_guard_of_their_inputs_device(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def on_device(device):
        seen.append(device)
        yield

    monkeypatch.setattr(op_module, "_on_device", on_device)
    op = attnc.load("gla")
    args = random_arguments(op.analysis, B=1, T=8, H=2, dims={"K": 16, "V": 16})
    op(**args, backend="triton")
    op.step(**{n: t[:, :1] for n, t in args.items()}, state=torch.zeros(1, 2, 16, 16), backend="triton")
    assert seen == [torch.device("cpu")] * 2
