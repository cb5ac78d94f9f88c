"""Compile Triton kernels in worker processes, for tuning.

Tuning compiles candidates x kernels (15 x 11 for mamba2). On a pool of threads, mamba2's
tuning still took 107 s on the H100 machine's 16 cores. A Triton compile takes and drops
Python's GIL many times (beside one busy Python thread a compile of gla's kernels took
twice as long on the CPU machine), so compiles on threads wait for each other; processes
have a GIL each. Triton 3.6 also builds a C launcher per kernel signature with the host's
C compiler when a process first loads a kernel: the workers build those too.

1. `captured_compiles(jobs)`: while it is active, a kernel-cache miss of the JIT (a
   launch or `kernel.warmup(...)` of a specialisation not compiled yet) is not compiled
   but appended to `jobs` as a `CompileJob`: the kernel's file, its specialisation
   (signature, constexprs, attributes) and the JIT's options, as Triton's
   `jit_cache_hook` hands them over (the same data Triton's own `preload` rebuilds a
   compile from).
2. `CompilePool(workers).compile(jobs)` (or `compile_jobs`): worker processes (`python -m
   attnc.runtime.compile_pool`, started when the pool is made) import each kernel's
   module from its file and run `triton.compile` on the same source, target and options,
   which writes the kernel to Triton's on-disk cache (and build its launcher).
3. The next launch of each kernel in this process misses the JIT's in-memory cache,
   asks `triton.compile`, and finds the kernel on disk under the same key: it loads
   instead of compiling.

Nothing here decides what runs: a job that fails, or a worker that dies, leaves its
kernel to be compiled (and its error raised) by the launch that needs it.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("attnc.compile_pool")


@dataclass(frozen=True)
class CompileJob:
    """One compile the JIT asked for."""

    path: str            # the file of the kernel's module
    module: str          # that module's name in sys.modules
    name: str            # the @triton.jit function's qualified name in it
    signature: dict      # parameter -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict     # parameter path -> value
    attrs: dict          # parameter path -> attributes (divisibility)
    options: dict        # the JIT's options (num_warps, num_stages, ...)
    target: tuple        # (backend, arch, warp_size)
    cache_key: str       # the kernel's `cache_key` in the process that asked
    source_digest: str   # sha256 of the kernel's source there

    @property
    def label(self) -> str:
        return f"{self.name}[num_warps={self.options.get('num_warps')}, " \
               f"num_stages={self.options.get('num_stages')}]"


@dataclass(frozen=True)
class CompileResult:
    job: CompileJob
    seconds: float
    error: str | None = None  # the compiler's (or the worker's) error, first line

    @property
    def ok(self) -> bool:
        return self.error is None


# --- capturing what the JIT would compile ---------------------------------------------


@contextlib.contextmanager
def captured_compiles(jobs: list[CompileJob]) -> Iterator[list[CompileJob]]:
    """Within: each kernel-cache miss of a @triton.jit kernel appends its compile to `jobs`
    (once per specialisation and options) and compiles nothing. A launch that misses
    launches nothing: use `kernel.warmup(...)` (or a replaced launch) under it."""
    from triton import knobs
    from triton.runtime.driver import driver

    previous = knobs.runtime.jit_cache_hook
    seen: set[tuple[str, str, str]] = set()

    def hook(*, key, fn, compile, **_):
        function = fn.jit_function
        identity = (function.fn.__module__, function.fn.__qualname__, str(key))
        if identity not in seen:
            seen.add(identity)
            jobs.append(_job(function, compile, driver))
        return True  # do not compile here

    knobs.runtime.jit_cache_hook = hook
    try:
        yield jobs
    finally:
        knobs.runtime.jit_cache_hook = previous


def _job(function, compile: dict, driver) -> CompileJob:
    data = json.loads(compile["specialization_data"])
    target = data.get("target")  # Triton >= 3.7 serialises it; 3.6 leaves it to the driver
    if target is None:
        current = driver.active.get_current_target()
        target = {"backend": current.backend, "arch": current.arch,
                  "warp_size": current.warp_size}
    path = inspect.getsourcefile(function.fn) or function.fn.__code__.co_filename
    return CompileJob(cache_key=function.cache_key, source_digest=_digest(function.src),
                      path=os.path.abspath(path), module=function.fn.__module__,
                      name=function.fn.__qualname__, signature=dict(compile["signature"]),
                      constexprs=dict(compile["constants"]), attrs=dict(compile["configs"][0]),
                      options=_tuples(data["options"]),
                      target=(target["backend"], target["arch"], target["warp_size"]))


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _tuples(value):
    """JSON gave lists where the options held tuples (Triton's preload does the same)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# --- compiling in worker processes ------------------------------------------------------


def default_workers() -> int:
    """The CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


class CompilePool:
    """`workers` compile processes (default: `default_workers()`), started at once, so that
    their start (importing torch, triton and attnc: seconds) overlaps whatever the caller
    does before `compile`. Use as a context manager; `close` ends them."""

    def __init__(self, workers: int | None = None):
        count = max(1, workers or default_workers())
        env = _worker_environment()
        self._workers = [_Worker(env) for _ in range(count)]

    def __enter__(self) -> "CompilePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compile(self, jobs: list[CompileJob]) -> list[CompileResult]:
        """Compile `jobs` into Triton's on-disk cache, each worker taking the next job when
        it is done with one. Returns a result per job a worker took up; a worker that could
        not start or died is logged, and the jobs it did not take are left to the launches
        that need them."""
        pending: queue.Queue = queue.Queue()
        # the longest first, so that none is left to run alone at the end: with fewer warps
        # each thread holds more of a tile, and the compiler takes longer (mamba2's tuning at
        # K = V = 128: 5 of the 10 slowest of its 131 compiles had 2 warps, the slowest 12 s)
        for job in sorted(jobs, key=lambda job: job.options.get("num_warps", 4)):
            pending.put(job)
        results: list[CompileResult] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=worker.serve, args=(pending, results, lock),
                                    name=f"attnc-compile-{i}", daemon=True)
                   for i, worker in enumerate(self._workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = [r for r in results if not r.ok]
        for result in failed:
            log.debug("compile_pool: %s failed: %s", result.job.label, result.error)
        log.info("compile_pool: %d kernels on %d processes, %d failed, %d not taken up",
                 len(jobs), len(self._workers), len(failed), len(jobs) - len(results))
        return results

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


def compile_jobs(jobs: list[CompileJob], workers: int | None = None) -> list[CompileResult]:
    """`CompilePool.compile` on a pool of `workers` processes (never more than jobs)."""
    if not jobs:
        return []
    with CompilePool(min(workers or default_workers(), len(jobs))) as pool:
        return pool.compile(jobs)


def _worker_environment() -> dict[str, str]:
    from triton import knobs

    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = knobs.cache.dir  # where this process will look for them
    env["TRITON_INTERPRET"] = "0"
    env.pop("ATTNC_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""            # a worker compiles; it never needs a GPU
    # the worker imports attnc and the kernels' modules from where this process does
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and os.path.isdir(p)]
                                        + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class _Worker:
    """One `python -m attnc.runtime.compile_pool` process: a pickled CompileJob to its
    stdin, a pickled (seconds, error) back from its stdout."""

    def __init__(self, env: dict[str, str]):
        self._errors = tempfile.TemporaryFile()
        self.process = None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "attnc.runtime.compile_pool"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=self._errors, env=env)
        except OSError as err:
            log.warning("compile_pool: cannot start a compile worker: %s", err)

    def serve(self, pending: queue.Queue, results: list, lock: threading.Lock) -> None:
        """Feed this worker jobs until none are left (or it dies)."""
        if self.process is None:
            return
        job = None
        try:
            while True:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    request = pickle.dumps(job)
                except Exception as err:  # a constexpr value pickle cannot carry
                    with lock:
                        results.append(CompileResult(job, 0.0, f"not sent to a worker: {err}"))
                    continue
                self.process.stdin.write(request)
                self.process.stdin.flush()
                seconds, error = pickle.load(self.process.stdout)
                with lock:
                    results.append(CompileResult(job, seconds, error))
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            self._errors.seek(0)
            tail = self._errors.read().decode(errors="replace").strip().splitlines()[-3:]
            log.warning("compile_pool: a compile worker died%s (%s): %s",
                        f" compiling {job.label}" if job else "", type(err).__name__,
                        " | ".join(tail) or "no message")
            self.close()

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError, ValueError):
                pickle.dump(None, self.process.stdin)
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._errors.close()


# --- the worker -------------------------------------------------------------------------


def _kernel(job: CompileJob):
    """The @triton.jit function of a job, its module imported from its file under the
    name it has in the process that asked (Triton's cache key hashes the source, which
    the kernel's module and the modules it loads make the same)."""
    import importlib.util

    from triton.runtime.jit import JITFunction

    from .loader import settle_kernel_keys

    module = sys.modules.get(job.module)
    if module is None:
        spec = importlib.util.spec_from_file_location(job.module, job.path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {job.path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[job.module] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[job.module]
            raise
        settle_kernel_keys(module)
    function = module
    for part in job.name.split("."):
        function = getattr(function, part)
    if not isinstance(function, JITFunction):
        raise TypeError(f"{job.name} in {job.path} is not a @triton.jit function")
    return function


def compile_job(job: CompileJob):
    """Compile one job as the JIT would (Triton's `preload` rebuilds a compile the same
    way): the kernel's source, specialisation, target and parsed options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    function = _kernel(job)
    if _digest(function.src) != job.source_digest:
        raise RuntimeError(f"{job.name} in {job.path} is not the source the kernel was "
                           "launched with (the file changed since)")
    # Triton's key for a kernel hashes its source, its callees' keys and the constexpr
    # globals they use, but in Triton 3.6 a caller whose callees were not hashed yet misses
    # their globals (DependenciesFinder._update_hash merges them before it hashes the
    # callee; 3.9 hashes first): keys depend on the order in which a process first hashed
    # its kernels. The kernel is compiled under the key it has in the process that will
    # launch it and look it up by that key.
    function.hash = job.cache_key
    target = GPUTarget(*job.target)
    options = make_backend(target).parse_options(dict(job.options))
    source = ASTSource(function, dict(job.signature), dict(job.constexprs), dict(job.attrs))
    compiled = triton.compile(source, target=target, options=options.__dict__)
    if target.backend == "cuda":
        _build_launcher(source, compiled)
    return compiled


def _build_launcher(source, compiled) -> bool:
    """Build the kernel's launcher into Triton's cache where Triton builds one per kernel
    signature: Triton 3.6 compiles a C launcher with the host's C compiler (seconds each)
    when a process first loads the kernel, and that would happen one by one in the tuning
    process. Later Triton versions launch through one generic launcher; there, and where
    the launcher cannot be built here (no libcuda on a machine without a GPU), this does
    nothing and the loading process does what it would have done."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.build import compile_module_from_src  # noqa: F401 - Triton <= 3.6
    except ImportError:
        return False
    if not hasattr(nvidia, "make_launcher"):
        return False
    try:
        nvidia.CudaLauncher(source, compiled.metadata)
    except Exception as err:  # no libcuda, no C compiler: the loading process will say
        log.debug("compile_pool: no launcher built for %s: %s", source.name, err)
        return False
    return True


def serve(requests, replies) -> None:
    """The worker's loop: a pickled CompileJob in, a pickled (seconds, error) out, until
    None comes in."""
    while True:
        job = pickle.load(requests)
        if job is None:
            return
        start = time.perf_counter()
        error = None
        try:
            compile_job(job)
        except Exception as err:  # the compiler's errors come in many types
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            error = f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
        pickle.dump((time.perf_counter() - start, error), replies)
        replies.flush()


def main() -> None:
    # replies go over the original stdout; anything else printed goes to stderr
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
