"""What one call of a compiled op does on a GPU, recorded on any machine.

    trace = record(op, B=1, T=512, H=16, dims={"K": 128, "V": 128}, dtype=torch.bfloat16)

runs the op's forward, backward and a decode step on CPU tensors while the launchers
decide as they would on a GPU (`kernels.as_on_gpu`: compiled kernels, bf16 dots, GPU
block sizes) and every Triton launch is recorded instead of run. Beside the launches it
records the PyTorch operations between them that move data (conversions, copies,
reductions), so a trace shows every pass over memory a call makes. `host_times(op, ...)`
times the same calls with the launches skipped: the host work attnc itself does per call.
Nothing here needs a GPU: runtime/aot.py compiles the recorded launches for one, and
`attnc trace` prints them.

Kernels do not run, so the values of everything they would write are undefined; the
host code between launches only looks at shapes (and at cu_seqlens, which is real).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels import as_on_gpu, decay_check

# launch options Triton takes beside a kernel's own parameters
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                   "launch_cooperative_grid", "launch_pdl")


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as a kernel sees it: its element type and size."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    aligned: bool  # data pointer divisible by 16 (Triton specialises on it)


@dataclass(frozen=True)
class KernelLaunch:
    """One `kernel[grid](...)` call: the kernel, its grid, its arguments by parameter
    name (tensors as TensorArg) and its launch options."""

    phase: str
    kernel: Any  # the @triton.jit function (JITFunction, or InterpretedFunction)
    grid: tuple[int, ...]
    arguments: dict[str, Any]
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the distinct tensors passed: what the launch reads or writes if it
        touches each once (a kernel that re-reads a tile from several programs moves more;
        one that reads part of a tensor moves less)."""
        return sum(a.nbytes for a in self.arguments.values() if isinstance(a, TensorArg))

    @property
    def data_dependent(self) -> tuple[str, ...]:
        """The tensor parameters this launch touches only for some chunks, as the data
        decide: those its module lists in DATA_DEPENDENT_TENSORS under this kernel, where
        the constexpr named beside them is set in this launch (e.g. the per-channel scores
        kernel stores the cumulated gate only for the chunks it takes by sub-chunks)."""
        fn = getattr(self.kernel, "fn", self.kernel)
        listed = getattr(fn, "__globals__", {}).get("DATA_DEPENDENT_TENSORS", {}).get(self.name, ())
        return tuple(name for flag, names in listed if self.arguments.get(flag) for name in names
                     if isinstance(self.arguments.get(name), TensorArg))

    @property
    def least_bytes(self) -> int:
        """`tensor_bytes` without the data-dependent tensors: what the launch moves where
        the data make it skip all of them."""
        return self.tensor_bytes - sum(self.arguments[name].nbytes for name in self.data_dependent)


@dataclass(frozen=True)
class TorchOp:
    """A PyTorch operation that moves data: bytes of its distinct tensor inputs and of
    its outputs."""

    phase: str
    name: str
    read_bytes: int
    written_bytes: int
    shapes: tuple[tuple[int, ...], ...]

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.written_bytes


@dataclass(frozen=True)
class HostSync:
    """A PyTorch op that makes the host wait for the device: it reads a tensor's value
    (`.item()`, `int(t)`) or sizes its output by the data (nonzero, repeat_interleave by
    a tensor). On a GPU it stalls the launch queue, and a CUDA graph cannot capture it."""

    phase: str
    name: str


@dataclass
class Trace:
    """Everything one call did, in order, by phase ("forward", "backward", "step")."""

    events: list[KernelLaunch | TorchOp | HostSync] = field(default_factory=list)
    floor_bytes: dict[str, int] = field(default_factory=dict)

    def launches(self, phase: str | None = None) -> list[KernelLaunch]:
        return [e for e in self.events if isinstance(e, KernelLaunch) and phase in (None, e.phase)]

    def torch_ops(self, phase: str | None = None) -> list[TorchOp]:
        return [e for e in self.events if isinstance(e, TorchOp) and phase in (None, e.phase)]

    def host_syncs(self, phase: str | None = None) -> list[HostSync]:
        return [e for e in self.events if isinstance(e, HostSync) and phase in (None, e.phase)]

    def phases(self) -> list[str]:
        return list(dict.fromkeys(e.phase for e in self.events))

    def bytes(self, phase: str) -> int:
        """Bytes moved in `phase`: the launches' tensor bytes plus the PyTorch ops'."""
        return (sum(k.tensor_bytes for k in self.launches(phase))
                + sum(t.bytes for t in self.torch_ops(phase)))

    def least_bytes(self, phase: str) -> int:
        """`bytes` where the data make every launch skip its data-dependent tensors
        (`KernelLaunch.least_bytes`)."""
        return (sum(k.least_bytes for k in self.launches(phase))
                + sum(t.bytes for t in self.torch_ops(phase)))


class _Recorder(TorchDispatchMode):
    """Records data-moving PyTorch ops (a dispatch mode) and Triton launches (by
    intercepting `kernel[grid]`) into one event list."""

    # allocation and metadata only: no pass over memory
    _FREE = ("aten.empty", "aten.new_empty", "aten.empty_like", "aten.empty_strided",
             "aten.detach", "aten.lift_fresh", "aten.alias", "aten._local_scalar_dense",
             "aten.set_", "aten.is_same_size")

    # write their output without reading their tensor arguments (those give dtype, device
    # or shape)
    _WRITE_ONLY = ("aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.zeros_like",
                   "aten.ones_like", "aten.full_like", "aten.fill_", "aten.zero_")

    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if self._syncs(func, name, kwargs):
            self.trace.events.append(HostSync(self.phase, name))
        if name.startswith(self._FREE):
            return out
        inputs = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
        storages = {_storage(t) for t in inputs}
        # views share their input's storage: no data moves
        fresh = [o for o in outputs if _storage(o) not in storages]
        if not fresh and not name.endswith("_"):
            return out
        read = 0 if name.startswith(self._WRITE_ONLY) else \
            sum(t.numel() * t.element_size() for t in _distinct(inputs) if t.numel() > 1)
        written = sum(o.numel() * o.element_size() for o in outputs)
        if read + written:
            self.trace.events.append(TorchOp(self.phase, name, read, written,
                                             tuple(tuple(o.shape) for o in outputs)))
        return out

    @staticmethod
    def _syncs(func, name, kwargs) -> bool:
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select"):
            return True
        # repeat_interleave by a tensor of counts sizes its output from their sum
        return str(func).startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None

    def launch(self, kernel, grid, args, kwargs):
        signature = inspect.signature(kernel.fn)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = {name: _describe(value) for name, value in bound.arguments.items()}
        grid = tuple(grid(arguments) if callable(grid) else grid)
        self.trace.events.append(KernelLaunch(self.phase, kernel, grid, arguments, options))


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr(), t.device
    except RuntimeError:
        return id(t), t.device


def _distinct(tensors):
    seen = {}
    for t in tensors:
        seen.setdefault(_storage(t), t)
    return seen.values()


def _flatten(x) -> Iterator[Any]:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _describe(value):
    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, tuple(value.shape), value.numel() * value.element_size(),
                         value.data_ptr() % 16 == 0)
    return value


@contextlib.contextmanager
def launches_replaced(launch) -> Iterator[None]:
    """Within: `kernel[grid](*args, **kwargs)` calls `launch(kernel, grid, args, kwargs)`
    instead of launching, and launchers decide as on a GPU."""
    from triton.runtime.jit import KernelInterface

    launch_as_defined = KernelInterface.__getitem__

    def replaced(kernel, grid):
        return lambda *args, **kwargs: launch(kernel, grid, args, kwargs)

    KernelInterface.__getitem__ = replaced
    try:
        with as_on_gpu():
            yield
    finally:
        KernelInterface.__getitem__ = launch_as_defined


@contextlib.contextmanager
def _recording(trace: Trace) -> Iterator[_Recorder]:
    recorder = _Recorder(trace)
    with launches_replaced(recorder.launch), recorder:
        yield recorder


def record(op, *, B: int, T: int, H: int, dims: dict[str, int], dtype=torch.bfloat16,
           backward: bool = True, step: bool = True, step_batch: int | None = None,
           config: dict | None = None, chunk_size: int | None = None) -> Trace:
    """The trace of one call of `op` on random [B, T, H, ...] inputs in `dtype`: its
    forward, its backward (`backward`) and a one-token decode step for `step_batch`
    sequences (`step`, default B), as they would run on a GPU with `config`."""
    from .sampling import random_arguments

    trace = Trace()
    dims = {d.name: dims.get(d.name, 16) for d in op.spec.dims}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype,
                            requires_grad=backward)
    n = step_batch or B
    step_args = random_arguments(op.analysis, B=n, T=1, H=H, dims=dims, dtype=dtype)
    state_shapes = [(n, H, *(dims[d] for d in s.shape)) for s in op.spec.states]
    states = tuple(torch.empty(shape) for shape in state_shapes)
    trace.floor_bytes["forward"] = (sum(a.numel() * a.element_size() for a in args.values())
                                    + _output_bytes(op, B, T, H, dims, dtype))
    # (the device's decay-check flag is made once per process, not by every call)
    decay_check(next(iter(args.values())).device, "")
    with _recording(trace) as recorder:
        recorder.phase = "forward"
        outputs, _ = op(**args, backend="triton", config=config, chunk_size=chunk_size)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if backward:
            recorder.phase = "backward"
            cotangents = [torch.empty_like(o) for o in outputs]
            torch.autograd.backward(outputs, cotangents)
        if step:
            recorder.phase = "step"
            op.step(**step_args, state=states[0] if len(states) == 1 else states,
                    inplace=True, backend="triton")
    return trace


def _output_bytes(op, B, T, H, dims, dtype) -> int:
    from ..dsl.check import output_shapes

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in output_shapes(op.spec).values():
        n = B * T * H
        for d in shape:
            n *= dims[d]
        total += n * size
    return total


def host_times(op, *, B: int = 1, T: int = 64, H: int = 2, dims: dict[str, int] | None = None,
               dtype=torch.bfloat16, repeats: int = 100) -> dict[str, float]:
    """Median microseconds of host work per call of `op`, as on a GPU but with no kernel
    launched: {"forward": ..., "forward+backward": ..., "step": ...} (a decode step of one
    token for B sequences).

    What it counts is attnc's own Python between the user's call and the kernels (binding,
    launchers, autograd, the PyTorch ops between launches, which run here on small CPU
    tensors) on this machine's CPU. It leaves out what a GPU run adds on top: Triton's
    launch of each kernel and CUDA's enqueue of each PyTorch op. When this exceeds a
    call's GPU time, a GPU waits for the host: timings measure the host, not the kernels."""
    import statistics
    import time

    from .sampling import random_arguments

    dims = {d.name: (dims or {}).get(d.name, 32) for d in op.spec.dims}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype)
    grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    step_args = random_arguments(op.analysis, B=B, T=1, H=H, dims=dims, dtype=dtype)
    states = tuple(torch.randn(B, H, *(dims[d] for d in s.shape)) for s in op.spec.states)
    state = states[0] if len(states) == 1 else states

    def forward():
        op(**args, backend="triton")

    def forward_backward():
        for t in grads.values():  # as a training step's zero_grad: no adds into the last call's grads
            t.grad = None
        outputs, _ = op(**grads, backend="triton")
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    def step():
        op.step(**step_args, state=state, inplace=True, backend="triton")

    def median_us(call) -> float:
        for _ in range(max(3, repeats // 10)):  # first calls load modules and fill caches
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    with launches_replaced(lambda kernel, grid, args, kwargs: None):
        return {"forward": median_us(forward), "forward+backward": median_us(forward_backward),
                "step": median_us(step)}
