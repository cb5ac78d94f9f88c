"""The compile pool's own error paths (runtime/compile_pool.py): a job that cannot be
compiled comes back with its error, a worker that dies is reported and its jobs are left
to the launches, and the other workers go on. Compiling real kernels in workers, and the
launches finding them, is tested with tuning's precompile (tests/test_autotune.py). Also:
loaded kernels get one Triton cache key whatever order a process hashes them in."""
import json
import logging
import subprocess
import sys

import pytest

from attnc.runtime.compile_pool import CompileJob, CompilePool, compile_jobs


def _job(path, name="kernel"):
    return CompileJob(path=str(path), module=f"attnc_test_{abs(hash(str(path)))}", name=name,
                      signature={}, constexprs={}, attrs={}, options={"num_warps": 4},
                      target=("cuda", 90, 32), cache_key="0" * 64, source_digest="0" * 64)


def test_a_job_that_cannot_compile_comes_back_with_its_error(tmp_path):
    not_a_kernel = tmp_path / "plain.py"
    not_a_kernel.write_text("kernel = 3\n")
    results = compile_jobs([_job(tmp_path / "missing.py"), _job(not_a_kernel)], workers=2)
    errors = sorted(r.error for r in results)
    assert len(results) == 2 and not any(r.ok for r in results)
    assert errors[0].startswith("FileNotFoundError") and "missing.py" in errors[0]
    assert errors[1].startswith("TypeError") and "is not a @triton.jit function" in errors[1]


def test_a_worker_that_dies_is_reported_and_the_rest_go_on(tmp_path, caplog):
    fatal = tmp_path / "fatal.py"
    fatal.write_text("import os, sys\nsys.stderr.write('dying on purpose\\n')\nos._exit(3)\n")
    plain = tmp_path / "plain.py"
    plain.write_text("kernel = 3\n")
    jobs = [_job(fatal)] + [_job(plain) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="attnc"), CompilePool(1) as pool:
        results = pool.compile(jobs)
    # one worker: it died on the first job, and nobody took up the other three
    assert results == []
    assert any("compile worker died compiling kernel" in r.message and
               "dying on purpose" in r.message for r in caplog.records)
    with CompilePool(2) as pool:
        results = pool.compile(jobs)
    # two workers: one dies on the fatal job, the other compiles (and rejects) the rest
    assert len(results) == 3 and all("is not a @triton.jit function" in r.error for r in results)


def test_no_jobs_start_no_workers():
    assert compile_jobs([]) == []


@pytest.mark.parametrize("value", [lambda: 0])
def test_a_job_pickle_cannot_carry_is_not_sent(tmp_path, value):
    job = CompileJob(**{**_job(tmp_path / "x.py").__dict__, "constexprs": {(0,): value}})
    results = compile_jobs([job], workers=1)
    assert len(results) == 1 and results[0].error.startswith("not sent to a worker")


SETTLED_KEYS = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
from attnc.runtime.loader import load_module
source = """
import triton
import triton.language as tl

SCALE: tl.constexpr = 3


@triton.jit
def kernel(x):
    tl.store(x, _helper(tl.load(x)))


@triton.jit
def _helper(value):
    return value * SCALE
"""
module = load_module(source, "settle_probe", sys.argv[1])
print(json.dumps({"hashed": [module.kernel.hash is not None, module._helper.hash is not None],
                  "kernel_globals": sorted(name for name, _ in module.kernel.used_global_vals)}))
'''


def test_a_kernel_is_keyed_with_its_helpers_globals_whatever_order_it_is_hashed_in(tmp_path):
    """Triton keys a compiled kernel (on disk too) by its source, its callees' keys and the
    constexpr globals they read. Triton 3.6 left a callee's globals out of its caller's key
    when the caller was hashed first, so keys depended on launch order. Loading a generated
    module hashes callees first: the kernel, defined before its helper here, is keyed with
    the helper's SCALE."""
    script = tmp_path / "probe.py"
    script.write_text(SETTLED_KEYS)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "modules")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"hashed": [True, True], "kernel_globals": ["SCALE"]}
