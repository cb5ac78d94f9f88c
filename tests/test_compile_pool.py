"""The compile pool's own error paths (runtime/compile_pool.py): a job that cannot be
compiled comes back with its error, a worker that dies is reported and its jobs are left
to the launches, and the other workers go on. Compiling real kernels in workers, and the
launches finding them, is tested with tuning's precompile (tests/test_autotune.py)."""
import logging

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
