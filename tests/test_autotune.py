"""Autotuning: candidate pruning, shape buckets, tuning with a fake bench, persisted configs
found again without tuning (in this process and another), the interpreter skipping it,
configs reaching the launchers, and `attnc cache tune`'s error paths."""
import json
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc.runtime import autotune
from attnc.runtime.cache import KernelCache
from attnc.runtime.chunk_delta_op import ChunkDeltaFunction, chunk_delta
from attnc.runtime.chunk_diag_op import ChunkDiagFunction, chunk_diag
from attnc.runtime.kernels import LaunchOptions
from attnc.runtime.cli import main

from conftest import HAS_CUDA, gpu

DIMS = {"K": 32, "V": 32}


def _effective(op, config, dims, dtype=torch.bfloat16):
    """The launchers' plans for `config`: one per chunk call of `op`."""
    return [(kind, make(config["chunk_size"], {k: v for k, v in config.items() if k != "chunk_size"}))
            for kind, make in autotune._call_plans(op, dims, dtype)]


# --- candidates ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gla", "deltanet"])
def test_candidates_are_valid_and_fit_shared_memory(name):
    op = attnc.load(name)
    dims = {"K": 128, "V": 128}
    fast = autotune.candidates(op, T=4096, dims=dims, dtype=torch.bfloat16, mode="fast")
    full = autotune.candidates(op, T=4096, dims=dims, dtype=torch.bfloat16, mode="full")
    assert fast[0] == {"chunk_size": 64}  # the defaults lead
    assert 5 <= len(fast) <= 21 < len(full)
    # narrower state blocks are a candidate of their own (the defaults narrow them only for
    # few sequences, which candidates are not planned for)
    assert {"chunk_size": 64, "state_block_v": 16} in fast
    # ungrouped state passes where the defaults group them: at T = 4096 only the chunk size
    # of 32 makes the two groups of 64 chunks the defaults take
    assert [c for c in fast if "state_group" in c] == [{"chunk_size": 32, "state_group": 0}]
    short = autotune.candidates(op, T=2048, dims=dims, dtype=torch.bfloat16, mode="fast")
    assert not any("state_group" in c for c in short)
    # the delta rule's state passes unpipelined: a key the diagonal family's launchers reject
    assert ({"chunk_size": 64, "state_stages": 1} in fast) == (name == "deltanet")
    assert {c["chunk_size"] for c in full} <= set(autotune.CHUNK_SIZES)
    for config in full:
        for kind, plan in _effective(op, config, dims):
            assert plan is not None
            for block in (plan.block_k, plan.block_v, plan.state_block_v, plan.chunk_size):
                assert block >= 16 and block & (block - 1) == 0
            assert plan.num_warps in autotune.NUM_WARPS and plan.num_stages in autotune.NUM_STAGES
            assert autotune.shared_memory_estimate(kind, plan, 2) <= autotune.SM90_SHARED_MEMORY
    # the same launches never appear twice
    resolved = [tuple(autotune._tuning_values(p) for _, p in _effective(op, c, dims)) for c in full]
    assert len(resolved) == len(set(resolved))


def test_shared_memory_limit_prunes_big_chunks_and_blocks():
    op = attnc.load("gla")
    dims = {"K": 128, "V": 128}
    roomy = autotune.candidates(op, T=4096, dims=dims, dtype=torch.float32, mode="full",
                                shared_memory=1 << 30)
    tight = autotune.candidates(op, T=4096, dims=dims, dtype=torch.float32, mode="full",
                                shared_memory=64 * 1024)
    assert {c["chunk_size"] for c in roomy} == {32, 64, 128}
    assert 0 < len(tight) < len(roomy)
    assert 128 not in {c["chunk_size"] for c in tight}
    for config in tight:
        for kind, plan in _effective(op, config, dims, torch.float32):
            assert autotune.shared_memory_estimate(kind, plan, 4) <= 64 * 1024
    # fp32 streams twice the bytes of bf16: fewer configs fit the same limit
    half = autotune.candidates(op, T=4096, dims=dims, dtype=torch.bfloat16, mode="full",
                               shared_memory=64 * 1024)
    assert len(half) > len(tight)
    assert autotune.candidates(op, T=4096, dims=dims, dtype=torch.float32, shared_memory=1024) == []


def test_candidates_respect_dims_sequence_length_and_a_fixed_chunk_size():
    op = attnc.load("retnet")
    small = {"K": 16, "V": 16}
    for config in autotune.candidates(op, T=4096, dims=small, dtype=torch.bfloat16, mode="full"):
        assert all(v == 16 for k, v in config.items() if "block" in k), config
    short = autotune.candidates(op, T=20, dims=DIMS, dtype=torch.bfloat16, mode="fast")
    assert {c["chunk_size"] for c in short} == {32}
    fixed = autotune.candidates(op, T=4096, dims=DIMS, dtype=torch.bfloat16, chunk_size=128)
    assert fixed and {c["chunk_size"] for c in fixed} == {128}
    with pytest.raises(ValueError, match="fast, full"):
        autotune.candidates(op, T=64, dims=DIMS, dtype=torch.bfloat16, mode="off")
    # the launchers reject what no candidate may contain
    with pytest.raises(ValueError, match="block_k=8"):
        ChunkDiagFunction.module_for(attnc.runtime.chunk_diag_op.kernel_spec(
            torch.empty(1, 1, 1, 16), None, None, False))._Plan(
            torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16), None, 64, True, "tf32", False,
            {"block_k": 8})


# --- buckets -------------------------------------------------------------------------


def test_shape_bucket():
    bucket = autotune.shape_bucket
    assert bucket(2, 1000, 16, {"K": 128, "V": 64}, torch.bfloat16) == \
        "tokens=2048 seqs=2 H=16 K=128 V=64 bfloat16"
    # neighbouring sizes share a bucket; batch (state-pass parallelism), heads, dims and
    # dtype do not
    assert bucket(4, 1000, 8, DIMS, torch.float16) == bucket(4, 1020, 8, DIMS, torch.float16)
    assert bucket(1, 4096, 8, DIMS, torch.float16) != bucket(2, 2048, 8, DIMS, torch.float16)
    assert bucket(4, 1000, 8, DIMS, torch.float16) != bucket(4, 1000, 8, DIMS, torch.bfloat16)
    assert bucket(4, 1000, 8, DIMS, torch.float16) != bucket(4, 1000, 4, DIMS, torch.float16)
    assert bucket(1, 3000, 4, DIMS, torch.float32, num_sequences=3, chunk_size=32) == \
        "tokens=4096 seqs=4 H=4 K=32 V=32 float32 varlen chunk=32"
    assert bucket(1, 64, 2, {"V": 64, "K": 128}, torch.bfloat16) == \
        bucket(1, 64, 2, {"K": 128, "V": 64}, torch.bfloat16)


# --- tuning with a fake bench ----------------------------------------------------------


def _fake_bench(ran, run_first=False):
    """Deterministic fake timings that differ per config; records what each trial held."""
    def bench(trial):
        for name, tensor in trial.arguments.items():
            assert tensor.requires_grad and tensor.count_nonzero() == tensor.numel(), name
        assert all(g.count_nonzero() == g.numel() for g in trial.output_grads)
        if run_first and not ran:
            trial()  # the real training step, once, in the interpreter
        ran.append(dict(trial.config))
        key = json.dumps(trial.config, sort_keys=True)
        return 1.0 + sum(map(ord, key)) % 97 / 100
    return bench


def test_tune_picks_the_fastest_and_persists_it():
    op = attnc.load("gla")
    ran = []
    bench = _fake_bench(ran, run_first=True)
    result = autotune.tune(op, B=1, T=40, H=2, dims=DIMS, dtype=torch.float32, device="cpu",
                           bench=bench, progress=False)
    expected = autotune.candidates(op, T=40, dims=DIMS, dtype=torch.float32, mode="fast")
    assert ran == expected  # every candidate, once
    times = {json.dumps(c, sort_keys=True): ms for c, ms in result.timings}
    assert result.config == min(expected, key=lambda c: times[json.dumps(c, sort_keys=True)])
    assert result.bucket == autotune.shape_bucket(1, 40, 2, DIMS, torch.float32)
    configs = json.loads((KernelCache().entries_dir / op.cache_key("cpu") / "configs.json").read_text())
    assert configs == {"cpu": {result.bucket: result.config}}
    assert autotune.tuned_config(op, "cpu", result.bucket) == result.config
    assert autotune.tuned_config(op, "cpu", "tokens=1 seqs=1") is None


def test_tune_varlen_and_full_mode_and_its_errors():
    op = attnc.load("deltanet")
    ran = []
    result = autotune.tune(op, B=1, T=200, H=2, dims=DIMS, dtype=torch.bfloat16, device="cpu",
                           num_sequences=3, mode="full", bench=_fake_bench(ran), progress=False)
    assert result.bucket.endswith("varlen") and len(ran) > 15
    with pytest.raises(autotune.TuningError, match="CUDA GPU"):
        autotune.tune(op, B=1, T=64, H=2, dims=DIMS, device="cpu")  # no bench: do_bench
    with pytest.raises(ValueError, match="has dims K, V"):
        autotune.tune(op, B=1, T=64, H=2, dims={"K": 32}, device="cpu", bench=_fake_bench([]))
    with pytest.warns(attnc.runtime.compiler.NotChunkParallelWarning):
        rwkv7 = attnc.load("rwkv7")
    with pytest.raises(autotune.TuningError, match="no chunk kernels"):
        autotune.tune(rwkv7, B=1, T=64, H=2, dims=DIMS, device="cpu", bench=_fake_bench([]))


def test_candidates_that_fail_to_compile_are_skipped():
    from triton.runtime.errors import OutOfResources

    op = attnc.load("retnet")

    def bench(trial):
        if trial.config.get("num_warps") != 8:
            raise OutOfResources(300000, 232448, "shared memory")
        return 1.0

    result = autotune.tune(op, B=1, T=64, H=2, dims=DIMS, device="cpu", bench=bench,
                           progress=False)
    assert result.config["num_warps"] == 8

    def nothing_fits(trial):
        raise OutOfResources(300000, 232448, "shared memory")

    with pytest.raises(autotune.TuningError, match="none of .* candidate configs ran"):
        autotune.tune(op, B=2, T=64, H=2, dims=DIMS, device="cpu", bench=nothing_fits,
                      progress=False)


def test_precompile_visits_every_launch_of_every_candidate_and_runs_none():
    """Each trial runs once with its launches handed to the compiler instead of run: the
    same kernels, grids and arguments as the trial's real launches, nothing computed."""
    from attnc.runtime.launches import record

    op = attnc.load("gla")
    pool = autotune.candidates(op, T=64, dims=DIMS, dtype=torch.float32, mode="fast")[:3]
    arguments, cu, grads = autotune._trial_data(op, 1, 64, 2, DIMS, torch.float32, "cpu", None)
    before = {n: t.detach().clone() for n, t in arguments.items()}
    seen = []

    def compile_launch(kernel, grid, args, kwargs):
        seen.append((kernel.__name__, kwargs.get("num_warps")))

    trials = [autotune.Trial(op, c, arguments, cu, grads) for c in pool]
    assert autotune.precompile(trials, workers=2, compile_launch=compile_launch) == len(seen)
    # a recorded training step has the same launches, one trial after another
    expected = []
    for config in pool:
        trace = record(op, B=1, T=64, H=2, dims=DIMS, dtype=torch.float32, step=False,
                       config=config)
        expected += [(k.name, k.options.get("num_warps")) for k in trace.launches()]
    # (gla's training step: at least 8 launches, forward and backward, in every candidate)
    assert seen == expected and len(seen) >= 3 * 8
    assert {w for _, w in seen} >= {2, 4, 8}  # the candidates' own launch options
    assert all(torch.equal(arguments[n].detach(), before[n]) for n in before)
    assert all(t.grad is None for t in arguments.values())  # no gradient was computed


def test_precompile_goes_on_past_a_failing_candidate():
    op = attnc.load("retnet")
    pool = autotune.candidates(op, T=64, dims=DIMS, dtype=torch.float32, mode="fast")[:2]
    arguments, cu, grads = autotune._trial_data(op, 1, 64, 2, DIMS, torch.float32, "cpu", None)
    seen = []

    def compile_launch(kernel, grid, args, kwargs):
        seen.append(kwargs.get("num_warps"))
        if len(seen) == 1:
            raise RuntimeError("out of resources")

    trials = [autotune.Trial(op, c, arguments, cu, grads) for c in pool]
    autotune.precompile(trials, compile_launch=compile_launch)
    assert len(seen) > 2 and pool[1].get("num_warps", 4) in seen[1:]


PRECOMPILE_IN_WORKERS = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels: the JIT, its cache and its hooks
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class NoGpuDriver:
    # what the JIT asks a driver for before it compiles: no GPU is touched
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True


driver.set_active(NoGpuDriver())
import attnc
from attnc.runtime import autotune
from attnc.runtime.launches import launches_replaced

op = attnc.load(sys.argv[1])
dims = {"K": 32, "V": 32}
pool = autotune.candidates(op, T=64, dims=dims, dtype=torch.bfloat16, mode="fast")[:2]
arguments, cu, grads = autotune._trial_data(op, 1, 64, 2, dims, torch.bfloat16, "cpu", None)
trials = [autotune.Trial(op, c, arguments, cu, grads) for c in pool]
compiles = []
knobs.compilation.listener = lambda **kw: compiles.append((kw["src"].name, kw["cache_hit"]))
launches = autotune.precompile(trials, workers=2)
in_process = list(compiles)
built = len(os.listdir(knobs.cache.dir))
# the timing pass: each launch misses the JIT's memory and asks triton.compile
compiles.clear()
def warmup(kernel, grid, args, kwargs):
    kernel.warmup(*args, grid=grid, **kwargs)
with launches_replaced(warmup):
    for trial in trials:
        trial()
print(json.dumps({"launches": launches, "in_process": in_process, "built": built,
                  "second": compiles, "candidates": len(pool)}))
"""


@pytest.mark.parametrize("name", ["retnet"])
def test_precompile_compiles_in_worker_processes_what_the_launches_find(tmp_path, name):
    """Tuning's precompile captures the compiles the JIT would make (its jit_cache_hook)
    and makes them in worker processes, into Triton's disk cache; the launches after it
    compile nothing: each finds its kernel there under the key it computes itself. Run
    with Triton's real compiler for an H100 and a driver stand-in (no GPU needed)."""
    script = tmp_path / "precompile.py"
    script.write_text(PRECOMPILE_IN_WORKERS)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               ATTNC_CACHE_DIR=str(tmp_path / "attnc"))
    run = subprocess.run([sys.executable, str(script), name], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["candidates"] == 2 and out["launches"] >= 2 * 7
    assert out["in_process"] == []          # the workers compiled, not this process
    kernels = {name for name, _ in out["second"]}
    # (retnet's 7 distinct kernels: its backward computes the intra-chunk scores in dq / dk and dv)
    assert len(kernels) >= 7 and len(out["second"]) >= out["built"] >= len(kernels)
    assert [hit for _, hit in out["second"]] == [True] * len(out["second"])


@gpu
def test_precompiled_candidates_time_without_compiling(monkeypatch):
    """After `precompile`, timing a candidate compiles nothing: every kernel the launches
    ask Triton for is found in its disk cache (where the workers put it)."""
    from triton import knobs

    op = attnc.load("gla")
    dims = {"K": 64, "V": 64}
    pool = autotune.candidates(op, T=256, dims=dims, dtype=torch.bfloat16, mode="fast")
    arguments, cu, grads = autotune._trial_data(op, 2, 256, 4, dims, torch.bfloat16, "cuda", None)
    trials = [autotune.Trial(op, c, arguments, cu, grads) for c in pool]
    assert autotune.precompile(trials) > 0
    compiles = []
    monkeypatch.setattr(knobs.compilation, "listener",
                        lambda **kw: compiles.append((kw["src"].name, kw["cache_hit"])))
    for trial in trials:
        trial()
    torch.cuda.synchronize()
    assert len(compiles) >= len(pool) * 8
    assert [name for name, hit in compiles if not hit] == []


# --- the op's lookup path ----------------------------------------------------------------


def _spy_launches(monkeypatch):
    """Record the LaunchOptions of every chunk_diag call."""
    seen = []
    original = ChunkDiagFunction.apply

    def apply(*args):
        seen.append(next(a for a in args if isinstance(a, LaunchOptions)))
        return original(*args)

    monkeypatch.setattr(ChunkDiagFunction, "apply", staticmethod(apply))
    return seen


def _no_tuning(*args, **kwargs):
    raise AssertionError("tune() was called")


def test_op_uses_the_persisted_config_without_tuning(monkeypatch):
    op = attnc.load("linear_attn")
    args = {n: torch.randn(1, 40, 2, 16) for n in ("q", "k", "v")}
    bucket = autotune.shape_bucket(1, 40, 2, {"K": 16, "V": 16}, torch.float32)
    op.plan_module("cpu")  # the entry the config is stored in
    tuned = {"chunk_size": 32, "num_warps": 2, "block_k": 16, "state_block_v": 16}
    KernelCache().put_config(op.cache_key("cpu"), "cpu", bucket, tuned)
    expected, _ = op(**args)  # the interpreter: defaults, nothing looked up

    # pretend this CPU is a GPU the op tunes for; tune() must not run: the config is found
    monkeypatch.setattr(autotune, "tuning_applies", lambda device: True)
    monkeypatch.setattr(autotune, "tune", _no_tuning)
    seen = _spy_launches(monkeypatch)
    out, _ = op(**args)
    assert [(o.chunk_size, dict(o.config)) for o in seen] == \
        [(32, {"num_warps": 2, "block_k": 16, "state_block_v": 16})]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the caller's chunk size wins; the bucket then names it, and a miss there tunes
    with pytest.raises(AssertionError, match="tune"):
        op(**args, chunk_size=16)
    seen.clear()
    op(**args, config={"chunk_size": 16, "num_warps": 8})  # explicit: no lookup at all
    assert [(o.chunk_size, dict(o.config)) for o in seen] == [(16, {"num_warps": 8})]


def test_a_failed_tuning_falls_back_to_the_defaults(monkeypatch, caplog):
    from attnc.runtime.binding import bind

    def fails(*args, **kwargs):
        raise autotune.TuningError("no candidate config fits")

    monkeypatch.setattr(autotune, "tuning_applies", lambda device: True)
    monkeypatch.setattr(autotune, "tune", fails)
    op = attnc.load("linear_attn")
    bound = bind(op.spec, {n: torch.randn(1, 40, 2, 16) for n in ("q", "k", "v")})
    with caplog.at_level("WARNING", logger="attnc"):
        assert autotune.config_for_call(op, bound, torch.float32) is None
    assert "default config" in caplog.text


CHILD = r"""
import json, sys, torch, attnc
from attnc.runtime import autotune
from attnc.runtime.binding import bind

def refuse(*args, **kwargs):
    raise RuntimeError("re-tuned in a second process")

autotune.tune = refuse
autotune.tuning_applies = lambda device: True
op = attnc.load("gla")
args = {n: torch.randn(1, 40, 2, 32) for n in ("q", "k", "v", "g")}
bound = bind(op.spec, args)
print(json.dumps(autotune.config_for_call(op, bound, torch.float32)))
"""


def test_a_second_process_finds_the_config_and_does_not_retune(tmp_path):
    op = attnc.load("gla")
    result = autotune.tune(op, B=1, T=40, H=2, dims=DIMS, dtype=torch.float32, device="cpu",
                           bench=_fake_bench([]), progress=False)
    env = dict(os.environ, ATTNC_CACHE_DIR=os.environ["ATTNC_CACHE_DIR"])
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result.config


def test_interpreter_and_off_skip_tuning(monkeypatch):
    monkeypatch.setattr(autotune, "tune", _no_tuning)
    monkeypatch.setattr(autotune, "tuned_config", _no_tuning)
    assert not autotune.tuning_applies("cpu")
    monkeypatch.setenv("ATTNC_INTERPRET", "1")
    assert not autotune.tuning_applies("cuda")
    monkeypatch.setenv("ATTNC_INTERPRET", "0")
    monkeypatch.setenv("ATTNC_AUTOTUNE", "off")
    assert not autotune.tuning_applies("cuda")
    monkeypatch.setenv("ATTNC_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="ATTNC_AUTOTUNE"):
        autotune.tuning_applies("cuda")
    monkeypatch.setenv("ATTNC_AUTOTUNE", "full")
    monkeypatch.setenv("ATTNC_INTERPRET", "1")
    seen = _spy_launches(monkeypatch)
    attnc.load("linear_attn")(**{n: torch.randn(1, 20, 2, 16) for n in ("q", "k", "v")})
    assert [(o.chunk_size, o.config) for o in seen] == [(64, ())]


# --- configs reach the launchers -------------------------------------------------------


def _grads(out, inputs):
    o, _ = out
    return torch.autograd.grad(o, inputs, torch.randn_like(o))


def test_diag_config_reaches_the_launchers():
    q, k, v = (torch.randn(1, 40, 2, 32, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 40, 2)).requires_grad_()
    inputs = (q, k, v, g)
    config = {"num_warps": 2, "num_stages": 1, "block_k": 16, "block_v": 16, "state_block_v": 16}
    module = ChunkDiagFunction.module_for(attnc.runtime.chunk_diag_op.kernel_spec(q, g, None, False))
    plan = module._Plan(q, v, None, 32, True, "tf32", False, config)
    assert (plan.num_warps, plan.num_stages, plan.block_k, plan.block_v, plan.state_block_v) == \
        (2, 1, 16, 16, 16)
    default = module._Plan(q, v, None, 32, True, "tf32", False, None)
    assert (default.num_warps, default.block_k, default.block_v) == (4, 32, 32)
    run = dict(exclusive=False, output_final_state=True, chunk_size=32, input_precision="ieee")
    torch.manual_seed(1)
    base = chunk_diag(*inputs, **run)
    base_grads = _grads(base, inputs)
    torch.manual_seed(1)
    tuned = chunk_diag(*inputs, **run, config=config)
    tuned_grads = _grads(tuned, inputs)
    for a, b in zip((*base, *base_grads), (*tuned, *tuned_grads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # summation order
    for bad, match in (({"warps": 2}, "expected one of"), ({"num_warps": 3}, "power of two"),
                       ({"block_v": 8}, "at least 16")):
        with pytest.raises(ValueError, match=match):
            chunk_diag(*inputs, **run, config=bad)


def test_delta_config_reaches_the_launchers():
    q, v = (torch.randn(1, 40, 2, 32, requires_grad=True) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(1, 40, 2, 32), dim=-1).requires_grad_()
    beta = torch.rand(1, 40, 2, requires_grad=True)
    inputs = (q, k, v, beta)
    config = {"num_warps": 8, "num_stages": 3, "block_k": 16, "block_v": 16, "state_block_v": 16}
    module = ChunkDeltaFunction.module_for(attnc.codegen.chunk_delta.DeltaKernelSpec(name="delta"))
    plan = module._Plan(q, v, None, 32, True, "tf32", False, config)
    assert (plan.num_warps, plan.common()["num_stages"], plan.common(num_stages=1)["num_stages"]) == (8, 3, 1)
    assert (plan.block_k, plan.block_v, plan.state_block_v, plan.state_block_k) == (16, 16, 16, 32)
    run = dict(output_final_state=True, chunk_size=32, input_precision="ieee")
    torch.manual_seed(1)
    base = chunk_delta(*inputs, **run)
    base_grads = _grads(base, inputs)
    torch.manual_seed(1)
    tuned = chunk_delta(*inputs, **run, config=config)
    tuned_grads = _grads(tuned, inputs)
    for a, b in zip((*base, *base_grads), (*tuned, *tuned_grads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # summation order


# --- attnc cache tune ------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["gla", "--shape", "1,2,3"], "gla needs B,T,H,K,V (5 numbers), got 3"),
    (["gla", "--shape", "1,x,3,4,5"], "expected comma-separated integers"),
    (["gla", "--shape", "1,0,3,4,5"], "sizes must be positive"),
    (["gla", "--shape", "1,64,2,16,16", "--dtype", "int8"], "--dtype 'int8': expected one of bf16"),
    (["gla", "--shape", "2,64,2,16,16", "--varlen", "3"], "B = 1"),
    (["rwkv7", "--shape", "1,64,2,16,16"], "no chunk kernels to tune"),
    (["nosuch", "--shape", "1,64,2,16,16"], "no shipped spec named 'nosuch'"),
])
def test_cache_tune_errors_are_one_line(argv, message, capsys):
    assert main(["cache", "tune", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cache_tune_reports_every_candidate_and_where_the_time_went(monkeypatch, capsys):
    """`attnc cache tune` prints the chosen config, the compile and timing wall times and
    every candidate's time, fastest first (the GPU is faked: tuning itself is tested above)."""
    timings = (({"chunk_size": 64}, 3.5), ({"chunk_size": 32}, 2.25), ({"chunk_size": 128}, 4.0))
    result = autotune.TuneResult(config={"chunk_size": 32}, bucket="tokens=64", device="fake",
                                 timings=timings, compile_s=12.5, timing_s=3.25)
    monkeypatch.setattr(autotune, "tune", lambda *args, **kwargs: result)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ATTNC_INTERPRET", "0")
    assert main(["cache", "tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:4] == ['  {"chunk_size": 32}',
                        "  2.250 ms per forward + backward; defaults 3.500 ms; 3 candidates timed",
                        "  compiling 12.5 s, then running and timing 3.2 s"]
    assert [line.split() for line in out[4:]] == [
        ["2.250", "ms", '{"chunk_size":', "32}"], ["3.500", "ms", '{"chunk_size":', "64}"],
        ["4.000", "ms", '{"chunk_size":', "128}"]]


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cache_tune_without_a_gpu(capsys):
    assert main(["cache", "tune", "gla", "--shape", "2,64,2,16,16", "--dtype", "bf16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnc cache tune: error: tuning needs a CUDA GPU")
    assert len(err.strip().splitlines()) == 1


@gpu
def test_tune_on_a_gpu_then_calls_find_the_config(monkeypatch, capsys):
    """`attnc cache tune` times real kernels and stores the fastest; a fresh op (as in a new
    process) then runs with it without tuning, and agrees with the defaults."""
    from attnc.runtime.sampling import random_arguments

    monkeypatch.setenv("ATTNC_AUTOTUNE", "fast")
    assert main(["cache", "tune", "gla", "--shape", "2,512,4,64,64", "--dtype", "bf16"]) == 0
    assert "ms per forward + backward" in capsys.readouterr().out
    op = attnc.load("gla")
    bucket = autotune.shape_bucket(2, 512, 4, {"K": 64, "V": 64}, torch.bfloat16)
    config = autotune.tuned_config(op, "cuda", bucket)
    assert config is not None and config["chunk_size"] in autotune.CHUNK_SIZES
    monkeypatch.setattr(autotune, "tune", _no_tuning)
    args = random_arguments(op.analysis, B=2, T=512, H=4, dims={"K": 64, "V": 64},
                            dtype=torch.bfloat16, device="cuda")
    tuned, _ = op(**args)
    default, _ = op(**args, config={})
    error = (tuned.float() - default.float()).norm() / default.float().norm()
    assert error < 1e-2, error
