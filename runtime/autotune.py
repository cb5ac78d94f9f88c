"""Autotuning of the chunk kernels: candidate configs, shape buckets, timing, persistence.

A config is one flat dict: `chunk_size` plus overrides of the launchers' defaults, named as
in the chunk templates' TUNABLE (num_warps, num_stages, block_k, block_v, state_block_v;
the diagonal family's fused_forward, fused_block_v; the delta family's state_stages; and
both families' fused_backward, which tuning leaves at its default),
e.g. {"chunk_size": 64, "num_warps": 8}. A key left out keeps the template's default; one
config serves every chunk call of an op (blocks wider than a call's dimension are narrowed
by the launchers).

Objective: the median time (triton.testing.do_bench) of one training step's kernels for
the shape: the op's forward on realistic random inputs (runtime/sampling.py) and the
backward of all outputs, with random output gradients, to every input and weight. No
initial or final state. Training is what these kernels are for, and the backward is most
of the time, so a config that only speeds up the forward loses.

Before timing, every candidate's kernels are compiled at once in worker processes
(`precompile`, runtime/compile_pool.py): compiling candidates x kernels one by one was most
of a cold start.

Tuned configs live in the kernel cache beside the op's sources (configs.json), per device
(`describe_device`) and shape bucket (`shape_bucket`), so a second process with the same
shapes starts without tuning. Tuning needs compiled kernels on a CUDA GPU; in Triton's
interpreter and on CPU tensors it never runs and the defaults hold.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .cache import KernelCache, describe_device
from .settings import settings

log = logging.getLogger("attnc")

# The grid. "full" times every point that survives pruning; "fast" times FAST_VARIANTS at
# each chunk size (overrides of the defaults, which differ by kernel family).
CHUNK_SIZES = (32, 64, 128)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (1, 2, 3)
BLOCKS = (32, 64)            # block_k and block_v of the chunk-parallel kernels
STATE_BLOCKS_V = (16, 32, 64)  # V blocks of the chunk-state passes
FAST_VARIANTS = (
    {},
    {"num_warps": 8},
    {"num_warps": 2},
    {"num_stages": 1},
    {"state_block_v": 16},  # more programs for long sequences in small batches
    # the delta rule's state passes unpipelined (their default pipelines them; the other
    # family's launchers reject the key, so it is no candidate there)
    {"state_stages": 1},
    # the forward through chunk states where the one pass is the default (many sequences x
    # heads); where it is not, this repeats the defaults (candidates are not planned for a
    # batch) and costs one timing, not a compile: its kernels are the defaults'
    {"fused_forward": 0},
    # the state passes over whole sequences where they take groups of chunks by default
    # (long sequences; offered only at such lengths)
    {"state_group": 0},
)
MODES = ("fast", "full")

# Opt-in shared memory per block of an H100 (sm_90), 227 KiB: the limit used when pruning
# candidates without a CUDA device to ask (tests, `candidates` called on a CPU machine).
SM90_SHARED_MEMORY = 232448

# Smallest dimension of a tl.dot operand: no block or chunk below it.
MIN_DOT_DIM = 16


class TuningError(Exception):
    """Tuning could not produce a config: no GPU, no chunk kernels, or no candidate ran."""


# --- where tuning applies ------------------------------------------------------------


def tuning_applies(device) -> bool:
    """Whether calls on `device` are tuned: CUDA, compiled kernels, ATTNC_AUTOTUNE != off."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type != "cuda":
        return False
    config = settings()
    return config.autotune != "off" and not config.interpret


def shape_bucket(B: int, T: int, H: int, dims: Mapping[str, int], dtype, *,
                 num_sequences: int | None = None, chunk_size: int | None = None) -> str:
    """The shape class a tuned config is stored under, e.g.
    'tokens=32768 seqs=16 H=16 K=128 V=128 bfloat16'.

    B*T and the number of sequences are rounded up to powers of two: the chunk-parallel
    kernels scale with the tokens, the chunk-state passes with sequences x heads, and
    neighbouring sizes share a config. Dims are listed by name. `num_sequences` marks a
    varlen call (B == 1, packed sequences); `chunk_size` one whose chunk size the caller fixed.
    """
    seqs = B if num_sequences is None else num_sequences
    parts = [f"tokens={_next_power_of_2(B * T)}", f"seqs={_next_power_of_2(seqs)}", f"H={H}"]
    parts += [f"{name}={size}" for name, size in sorted(dims.items())]
    parts.append(str(dtype).removeprefix("torch."))
    if num_sequences is not None:
        parts.append("varlen")
    if chunk_size is not None:
        parts.append(f"chunk={chunk_size}")
    return " ".join(parts)


def shape_bucket_of(bound, dtype, *, chunk_size: int | None = None) -> str:
    """`shape_bucket` of one bound call (runtime/binding.py's Bound)."""
    varlen = bound.cu_seqlens is not None
    return shape_bucket(bound.B, bound.T, bound.H, bound.dims, dtype,
                        num_sequences=bound.N if varlen else None, chunk_size=chunk_size)


# --- candidates ----------------------------------------------------------------------


def shared_memory_limit(device=None) -> int:
    """Shared memory one block may use on `device` (opt-in maximum); SM90_SHARED_MEMORY
    when `device` is not a CUDA device."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).shared_memory_per_block_optin
    return SM90_SHARED_MEMORY


def shared_memory_estimate(kind: str, plan, itemsize: int) -> int:
    """Bytes of shared memory the largest kernel of one chunk call needs, roughly.

    `plan`: the launcher's `_Plan` with a config applied; `itemsize`: bytes per streamed
    element. Counts the tl.dot operands of each kernel's inner loop once per pipeline stage
    and the tiles held across it once. A pre-filter only: configs that still fail to
    compile (Triton's OutOfResources) are skipped while timing.
    """
    BT, BK, BV, stages = plan.chunk_size, plan.block_k, plan.block_v, plan.num_stages
    SBV = plan.state_block_v
    if kind == "delta":
        SBK = plan.state_block_k
        chunk_parallel = stages * (BT * BK + BT * BV) * itemsize + 2 * BT * BT * 4
        # k, w and u tiles per pipeline stage, and the state as a dot operand
        state_stages = max(plan.state_pass_stages(False), plan.state_pass_stages(True))
        state_pass = (state_stages * (2 * BT * SBK + BT * SBV) + SBK * SBV) * itemsize
        # one stage; holds the fp32 scores, inverse and their gradient
        backward_wy = 2 * (BT * BK + BT * BV + BK * BV) * itemsize + 3 * BT * BT * 4
        return max(chunk_parallel, state_pass, backward_wy)
    chunk_parallel = stages * (BT * BK + BK * BV) * itemsize + (BT * BT + BT * BV) * itemsize
    state_pass = stages * (BK * BT + BT * SBV) * itemsize
    return max(chunk_parallel, state_pass)


def candidates(op, *, T: int, dims: Mapping[str, int], dtype, mode: str = "fast",
               chunk_size: int | None = None, shared_memory: int | None = None) -> list[dict]:
    """The configs worth timing for `op` at sequence length T and head dims `dims`.

    mode "fast": FAST_VARIANTS at each chunk size; "full": the whole grid (CHUNK_SIZES x
    NUM_WARPS x NUM_STAGES x BLOCKS^2 x STATE_BLOCKS_V). `chunk_size` fixes the chunk size.
    Pruned for validity (chunk sizes beyond the next power of two of T, blocks wider than
    the dimension they split, values a launcher rejects) and by `shared_memory_estimate`
    against `shared_memory` (default: an H100's). Chunk sizes are tried nearest 64 first,
    and each starts with the defaults, so the defaults at chunk size 64 lead when they fit.
    """
    if mode not in MODES:
        raise ValueError(f"autotune mode {mode!r}: expected one of {', '.join(MODES)}")
    limit = SM90_SHARED_MEMORY if shared_memory is None else shared_memory
    calls = _call_plans(op, dims, dtype)
    if chunk_size is not None:
        chunk_sizes = [chunk_size]
    else:
        fitting = [c for c in CHUNK_SIZES if c <= max(MIN_DOT_DIM, _next_power_of_2(T))]
        chunk_sizes = sorted(fitting or CHUNK_SIZES[:1], key=lambda c: (abs(c - 64), c))
    if mode == "fast":
        overrides = FAST_VARIANTS
    else:
        names = ("num_warps", "num_stages", "block_k", "block_v", "state_block_v")
        grid = (NUM_WARPS, NUM_STAGES, BLOCKS, BLOCKS, STATE_BLOCKS_V)
        overrides = [{}, *(dict(zip(names, values)) for values in itertools.product(*grid))]
    # a block wider than every dimension would only be narrowed by the launchers
    widest = max(MIN_DOT_DIM, _next_power_of_2(max(dims.values(), default=1)))
    overrides = [o for o in overrides if all(v <= widest for k, v in o.items() if "block" in k)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    chosen, seen = [], set()
    for size, override in itertools.product(chunk_sizes, overrides):
        plans = [(kind, make_plan(size, override)) for kind, make_plan in calls]
        if any(plan is None for _, plan in plans):
            continue  # a launcher rejects it
        if "state_group" in override and not _groups_state_passes(calls, size, T):
            continue  # the defaults take no groups at this length: the same launches
        resolved = tuple(_tuning_values(plan) for _, plan in plans)
        if resolved in seen:
            continue  # the same launches as a candidate already chosen
        seen.add(resolved)
        needed = max(shared_memory_estimate(kind, plan, itemsize) for kind, plan in plans)
        if needed > limit:
            log.debug("autotune: %s chunk_size=%d %s needs ~%d B of shared memory > %d; pruned",
                      op.name, size, override, needed, limit)
            continue
        chosen.append({"chunk_size": size, **override})
    return chosen


_MANY_SEQUENCES = 4096


def _groups_state_passes(calls, chunk_size: int, T: int) -> bool:
    """Whether a default plan of these calls takes its state passes in groups of chunks at
    sequence length T (a sequence of at least two groups)."""
    for _, make_plan in calls:
        group = getattr(make_plan(chunk_size, None), "state_group", 0)
        if group and -(-T // chunk_size) >= 2 * group:
            return True
    return False


def _call_plans(op, dims: Mapping[str, int], dtype) -> list[tuple[str, Callable]]:
    """(kind, make_plan(chunk_size, config) -> the launcher's _Plan or None) per chunk call,
    planned on meta tensors of the call's key and value widths."""
    from .chunk_delta_op import ChunkDeltaFunction
    from .chunk_diag_op import ChunkDiagFunction

    states = {st.name: st.shape for st in op.spec.states}
    calls = []
    for call, kernel in op.chunk_kernels():
        functions = ChunkDeltaFunction if call.kind == "delta" else ChunkDiagFunction
        module = functions.module_for(kernel)
        shape = states[call.state]
        key_dim = dims[shape[0]]
        value_dim = dims[shape[1]] if len(shape) > 1 else 1
        # as many sequences as fill any GPU: the defaults that depend on the batch (the state
        # passes' V block narrows for few sequences) take the values a config's own stand
        # beside, so that candidates are told apart (and their shared memory estimated) by
        # what they ask for, not by a batch of one
        q = torch.empty(_MANY_SEQUENCES, 1, 1, key_dim, dtype=dtype, device="meta")
        v = torch.empty(_MANY_SEQUENCES, 1, 1, value_dim, dtype=dtype, device="meta")

        def make_plan(chunk_size, config, module=module, q=q, v=v):
            try:
                return module._Plan(q, v, None, chunk_size, False, "tf32", False, config)
            except ValueError:
                return None

        calls.append((call.kind, make_plan))
    return calls


def _tuning_values(plan) -> tuple:
    """What a candidate resolves to in one launcher (the one-pass forward's values exist in
    the diagonal family's only)."""
    # (whether the forward runs in one pass by default depends on the batch, which the
    # candidates' plans do not know: only what a config asks for tells candidates apart)
    return (plan.chunk_size, plan.num_warps, plan.num_stages, plan.block_k, plan.block_v,
            plan.state_block_v, getattr(plan, "fused_forward_asked", None),
            getattr(plan, "fused_block_v", None), getattr(plan, "state_stages_asked", None),
            getattr(plan, "state_group", None))


# --- timing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One candidate's training step: `trial()` runs the op's forward with `config` on
    `arguments` and the backward of its outputs. `bench(trial)` times it."""

    op: object
    config: Mapping[str, int]
    arguments: Mapping[str, torch.Tensor]  # inputs and weights, requiring grad
    cu_seqlens: torch.Tensor | None
    output_grads: tuple[torch.Tensor, ...]

    def __call__(self) -> None:
        with torch.enable_grad():
            outputs, _ = self.op(**self.arguments, cu_seqlens=self.cu_seqlens,
                                 config=dict(self.config), backend="triton")
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            leaves = [t for t in self.arguments.values() if t.requires_grad]
            torch.autograd.grad(outputs, leaves, self.output_grads)


@dataclass(frozen=True)
class TuneResult:
    config: dict                            # the fastest candidate, as persisted
    bucket: str
    device: str                             # `describe_device`
    timings: tuple[tuple[dict, float], ...]  # (candidate, ms) for each that ran
    compile_s: float = 0.0                  # wall time of the parallel precompile (0: none)
    timing_s: float = 0.0                   # wall time of running and timing the candidates

    @property
    def best_ms(self) -> float:
        return min(ms for _, ms in self.timings)


def default_bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call of `fn`: the median of triton.testing.do_bench, which warms up
    (compiling kernels), flushes the L2 cache between calls and times with CUDA events."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def precompile(trials, *, workers: int | None = None,
               compile_launch: Callable | None = None) -> int:
    """Compile every trial's kernels before any is timed, on `workers` processes (default:
    the CPUs this process may use, at most 16). Returns the number of launches seen.

    Triton compiles a kernel on one core (its MLIR passes, then ptxas), and a tuning run
    compiles candidates x kernels of them: one by one, that was most of a cold start, and
    threads did not help much (a compile holds Python's GIL for much of its time). Here
    each trial runs once with its launches redirected: `kernel[grid](*args, **kw)` becomes
    `kernel.warmup(*args, grid=grid, **kw)`, which asks for exactly the specialisation that
    launch needs without running it; `compile_pool.captured_compiles` collects those
    compiles instead of making them, and `compile_pool.compile_jobs` makes them in worker
    processes, into Triton's on-disk cache, where the timing pass finds them. No generated
    kernel runs; the PyTorch ops between launches do, on whatever the buffers hold, and
    the host code only looks at shapes (and cu_seqlens, which are real). A compile that
    fails (a candidate out of resources) is dropped here and reported by the timing pass,
    which meets it again. `compile_launch(kernel, grid, args, kwargs)` replaces the
    warmup and the workers (tests)."""
    from .compile_pool import CompilePool, captured_compiles
    from .launches import launches_replaced

    launches = 0
    jobs: list = []

    def launch(kernel, grid, args, kwargs):
        nonlocal launches
        launches += 1
        if compile_launch is None:
            kernel.warmup(*args, grid=grid, **kwargs)
        else:
            compile_launch(kernel, grid, args, kwargs)

    # the workers start (imports: seconds) while the trials run
    pool = CompilePool(workers) if compile_launch is None else contextlib.nullcontext()
    capture = captured_compiles(jobs) if compile_launch is None else contextlib.nullcontext()
    with pool:
        with capture, launches_replaced(launch):
            for trial in trials:
                try:
                    trial()
                except Exception as err:  # the timing pass runs it for real and reports it
                    log.debug("autotune: precompiling %s: %s", trial.config, _first_line(err))
        if jobs:
            pool.compile(jobs)
    return launches


def tune(op, *, B: int, T: int, H: int, dims: Mapping[str, int], dtype=torch.bfloat16,
         device="cuda", num_sequences: int | None = None, chunk_size: int | None = None,
         mode: str | None = None, bench: Callable[[Callable[[], object]], float] | None = None,
         progress: bool | None = None, compile_first: bool | None = None) -> TuneResult:
    """Time the candidates for one shape, persist the fastest, return it.

    Shapes as at call time: inputs [B, T, H, dims]; `num_sequences` tunes varlen calls
    (B == 1, T tokens packed into that many sequences of near-equal length). `mode`: "fast"
    or "full" (default: ATTNC_AUTOTUNE, "fast" when it is "off"). `bench(trial) -> ms`
    (default `default_bench`); a candidate whose kernels fail to compile or run out of
    resources is skipped. `progress`: a status line on stderr (default: when it is a
    terminal). `compile_first`: compile every candidate's kernels in parallel before timing
    any (`precompile`; default: with the default bench, on a GPU). The config is stored with `KernelCache.put_config` under
    (op.cache_key(device), describe_device(device), shape_bucket(...)).
    """
    from ..codegen.plan import NoChunkForm

    device = torch.device(device)
    if bench is None:
        if device.type != "cuda" or settings().interpret:
            raise TuningError("tuning needs a CUDA GPU and compiled kernels (not Triton's "
                              "interpreter)")
        bench = default_bench
        compile_first = True if compile_first is None else compile_first
    if mode is None:
        mode = settings().autotune if settings().autotune != "off" else "fast"
    _check_dims(op, dims)
    if num_sequences is not None and (B != 1 or not 1 <= num_sequences <= T):
        raise ValueError(f"varlen tuning packs sequences along T with B == 1 and 1 <= "
                         f"num_sequences <= T; got B={B}, T={T}, num_sequences={num_sequences}")
    try:
        op.plan_module(device)  # builds the cache entry the config is stored in
        pool = candidates(op, T=T if num_sequences is None else -(-T // num_sequences),
                          dims=dims, dtype=dtype, mode=mode, chunk_size=chunk_size,
                          shared_memory=shared_memory_limit(device))
    except NoChunkForm as why:
        raise TuningError(f"{op.name} has no chunk kernels to tune: {why}") from None
    if not pool:
        raise TuningError(f"{op.name}: no candidate config fits this shape and device")
    bucket = shape_bucket(B, T, H, dims, dtype, num_sequences=num_sequences,
                          chunk_size=chunk_size)
    where = describe_device(device)
    show = sys.stderr.isatty() if progress is None else progress
    timings, failures = [], []
    # the caller may be under no_grad or inference_mode; the trials need autograd
    with torch.inference_mode(False), torch.enable_grad():
        arguments, cu_seqlens, output_grads = _trial_data(op, B, T, H, dims, dtype, device,
                                                          num_sequences)
        started = time.perf_counter()
        if compile_first:
            if show:
                print(f"\rattnc: compiling {len(pool)} candidates for {op.name}   ", end="",
                      file=sys.stderr, flush=True)
            precompile([Trial(op, config, arguments, cu_seqlens, output_grads) for config in pool])
        compiled = time.perf_counter()
        for i, config in enumerate(pool):
            if show:
                best = f"; best {min(ms for _, ms in timings):.3f} ms" if timings else ""
                print(f"\rattnc: tuning {op.name} ({bucket}) {i + 1}/{len(pool)}{best}   ",
                      end="", file=sys.stderr, flush=True)
            trial = Trial(op, config, arguments, cu_seqlens, output_grads)
            try:
                ms = float(bench(trial))
            except _SKIPPABLE as err:
                # running out of shared memory or registers is expected of some candidates
                level = logging.INFO if type(err).__name__ == "OutOfResources" else logging.WARNING
                log.log(level, "autotune: %s %s failed: %s", op.name, config, _first_line(err))
                failures.append((config, err))
                continue
            log.debug("autotune: %s %s: %.4f ms", op.name, config, ms)
            timings.append((config, ms))
    timed = time.perf_counter()
    if show:
        print(file=sys.stderr)
    if not timings:
        config, err = failures[-1]
        raise TuningError(f"{op.name}: none of {len(pool)} candidate configs ran; the last, "
                          f"{config}, failed with: {_first_line(err)}")
    best = min(timings, key=lambda item: item[1])[0]
    KernelCache().put_config(op.cache_key(device), where, bucket, best)
    log.info("autotune: %s on %s, %s: %s (%.4f ms of %d candidates)", op.name, where,
             bucket, best, min(ms for _, ms in timings), len(timings))
    return TuneResult(config=dict(best), bucket=bucket, device=where, timings=tuple(timings),
                      compile_s=compiled - started if compile_first else 0.0,
                      timing_s=timed - compiled)


def _skippable_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        errors += [CompilationError, OutOfResources]
    except ImportError:  # pragma: no cover - Triton moved them
        pass
    return tuple(errors)


_SKIPPABLE = _skippable_errors()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _check_dims(op, dims: Mapping[str, int]) -> None:
    expected = [d.name for d in op.spec.dims]
    if sorted(dims) != sorted(expected):
        raise ValueError(f"{op.name} has dims {', '.join(expected)}; got {', '.join(dims) or 'none'}")


def _trial_data(op, B, T, H, dims, dtype, device, num_sequences):
    """Random inputs (never zeros: runtime/sampling.py), varlen offsets and output grads."""
    from .sampling import random_arguments

    generator = torch.Generator().manual_seed(0)
    arguments = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype,
                                 device=device, generator=generator, requires_grad=True)
    cu_seqlens = None
    if num_sequences is not None:
        bounds = [round(i * T / num_sequences) for i in range(num_sequences + 1)]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    shapes = {r.name: r.shape for r in op.analysis.readouts}
    grads = tuple(
        torch.randn((B, T, H, *(dims[d] for d in shapes[name])), generator=generator)
        .to(device=device, dtype=dtype)
        for name in op.spec.outputs)
    return arguments, cu_seqlens, grads


# --- lookup --------------------------------------------------------------------------


def tuned_config(op, device, bucket: str) -> dict | None:
    """The persisted config of `op` for `device` and `bucket`, or None."""
    config = KernelCache().get_config(op.cache_key(device), describe_device(device), bucket)
    return dict(config) if config is not None else None


def config_for_call(op, bound, dtype, *, chunk_size: int | None = None) -> dict | None:
    """The config for one call of `op`: persisted, else tuned now (and persisted); None
    where tuning does not apply (`tuning_applies`) or the op has no chunk kernels."""
    if not tuning_applies(bound.device) or op.no_chunk_form is not None:
        return None
    bucket = shape_bucket_of(bound, dtype, chunk_size=chunk_size)
    config = tuned_config(op, bound.device, bucket)
    if config is not None:
        return config
    varlen = bound.cu_seqlens is not None
    log.warning("attnc: tuning %s for %s (once; the result is cached; ATTNC_AUTOTUNE=off "
                "skips it)", op.name, bucket)
    try:
        result = tune(op, B=bound.B, T=bound.T, H=bound.H, dims=dict(bound.dims), dtype=dtype,
                      device=bound.device, num_sequences=bound.N if varlen else None,
                      chunk_size=chunk_size)
    except TuningError as err:  # a call must not fail for want of a tuned config
        log.warning("attnc: %s; running %s with the default config", err, op.name)
        return None
    return result.config


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
