"""Compile recorded launches for a GPU on a machine without one.

Triton's interpreter accepts kernels that its GPU compiler rejects, and says nothing about
registers, spills or shared memory. `compile_trace(trace)` hands every distinct launch of
a trace (runtime/launches.py) to the real compiler for a target such as an H100
(`cuda:90`): Triton lowers it to PTX and `ptxas` to a cubin, with no GPU and no driver.
Each report says whether the kernel compiled (and the compiler's message if not), its
registers per thread, spilled bytes, and shared memory against the target's limit.

Triton's interpreter must be off in the process (`attnc aot` turns it off before triton
is imported): compiled kernels call other @triton.jit functions, which the interpreter
would have replaced.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .launches import KernelLaunch, TensorArg, Trace

# shared memory a block may use, by compute capability (bytes; CUDA's
# "maximum shared memory per block (opt-in)")
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64",
                  torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class AotError(RuntimeError):
    """Compiling for a GPU target cannot start (interpreter on, unknown target)."""


@dataclass(frozen=True)
class Target:
    backend: str
    arch: int
    warp_size: int = 32

    @classmethod
    def parse(cls, text: str) -> "Target":
        """"cuda:90" (or "sm_90", "sm90", "90")."""
        match = re.fullmatch(r"(?:cuda:|sm_?)?(\d+)a?", text.strip())
        if not match:
            raise AotError(f"target {text!r}: expected cuda:<compute capability>, e.g. cuda:90 "
                           "for an H100 or H200")
        return cls("cuda", int(match.group(1)))

    def __str__(self) -> str:
        return f"{self.backend}:{self.arch}"

    @property
    def shared_memory_limit(self) -> int | None:
        return SHARED_MEMORY_LIMIT.get(self.arch)


@dataclass(frozen=True)
class KernelReport:
    """What the compiler made of one launch."""

    name: str
    phase: str
    num_warps: int
    num_stages: int | None
    constants: str  # the launch's constexpr values, for telling variants apart
    seconds: float
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # local memory per thread (spills and stack)
    shared_bytes: int | None = None
    shared_limit: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.over_shared_limit

    @property
    def error_summary(self) -> str | None:
        """One line: the error type, where in the kernel (line:col of its source) and the
        compiler's reason (the last line of its message, which quotes the source first)."""
        if self.error is None:
            return None
        lines = [line.strip() for line in self.error.splitlines() if line.strip()]
        where = re.search(r"at (\d+:\d+)", lines[0])
        kind = lines[0].split(":", 1)[0]
        at = f" at {where.group(1)} of {self.name}" if where else ""
        return f"{kind}{at}: {lines[-1]}" if len(lines) > 1 else lines[0]

    @property
    def over_shared_limit(self) -> bool:
        return (self.shared_bytes is not None and self.shared_limit is not None
                and self.shared_bytes > self.shared_limit)


def _jit_function(kernel):
    """The compiled-mode @triton.jit function of a recorded kernel."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    raise AotError(f"kernel {kernel.__name__} was loaded under Triton's interpreter "
                   "(TRITON_INTERPRET=1); compiling for a GPU needs a process with it off "
                   "(run `attnc aot`, which turns it off)")


def source_for(launch: KernelLaunch):
    """The launch as a Triton ASTSource: signature from the argument types, constexprs
    from the constexpr parameters (and None arguments, and integers equal to 1, which
    Triton specialises the same way), divisibility-by-16 hints as Triton derives them."""
    from triton.compiler import ASTSource

    fn = _jit_function(launch.kernel)
    signature: dict[str, str] = {}
    constants: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        value = launch.arguments[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, TensorArg):
            if value.dtype not in _POINTER_TYPES:
                raise AotError(f"{launch.name}: argument {name} has dtype {value.dtype}")
            signature[name] = "*" + _POINTER_TYPES[value.dtype]
            if value.aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"
                constants[name] = 1
                continue
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
            constants[name] = value
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def _describe_constants(launch: KernelLaunch) -> str:
    fn = launch.kernel
    names = [p.name for p in getattr(fn, "params", []) if p.is_constexpr]
    parts = []
    for name in names:
        value = launch.arguments.get(name)
        parts.append(f"{name}={getattr(value, 'name', value)}")
    return " ".join(parts)


def _resource_usage(cubin: bytes, kernel_name: str) -> tuple[int | None, int | None]:
    """(registers, local bytes) of a cubin, from cuobjdump (shipped with Triton)."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([tool, "--dump-resource-usage", str(path)],
                                capture_output=True, text=True, check=False)
    registers = spills = None
    for line in result.stdout.splitlines():
        reg = re.search(r"REG:(\d+)", line)
        if reg:
            registers = int(reg.group(1))
            stack = re.search(r"STACK:(\d+)", line)
            local = re.search(r"LOCAL:(\d+)", line)
            spills = int(stack.group(1) if stack else 0) + int(local.group(1) if local else 0)
    return registers, spills


def _cuda_tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    return shutil.which(name)


def compile_launch(launch: KernelLaunch, target: Target) -> KernelReport:
    """Compile one recorded launch for `target` and report on it (errors included)."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages", "num_ctas")}
    num_warps = options.setdefault("num_warps", 4)
    common = dict(name=launch.name, phase=launch.phase, num_warps=num_warps,
                  num_stages=options.get("num_stages"), constants=_describe_constants(launch),
                  shared_limit=target.shared_memory_limit)
    start = time.perf_counter()
    try:
        source = source_for(launch)
        compiled = triton.compile(source, target=GPUTarget(target.backend, target.arch, target.warp_size),
                                  options=options)
    except AotError:
        raise
    except Exception as err:  # the compiler's own errors come in many types
        message = str(err).strip() or type(err).__name__
        return KernelReport(**common, seconds=time.perf_counter() - start,
                            error=f"{type(err).__name__}: {message}")
    registers, spills = _resource_usage(compiled.asm["cubin"], launch.name)
    return KernelReport(**common, seconds=time.perf_counter() - start, registers=registers,
                        spill_bytes=spills, shared_bytes=compiled.metadata.shared)


def compile_job(launch: KernelLaunch, target: Target):
    """The launch as a `compile_pool.CompileJob` for `target` (its specialisation as
    `source_for` derives it), for compiling in worker processes."""
    import hashlib
    import inspect
    import os

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from .compile_pool import CompileJob

    source = source_for(launch)
    fn = source.fn
    gpu = GPUTarget(target.backend, target.arch, target.warp_size)
    options = {k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages", "num_ctas")}
    return CompileJob(path=os.path.abspath(inspect.getsourcefile(fn.fn)), module=fn.fn.__module__,
                      name=fn.fn.__qualname__, signature=dict(source.signature),
                      constexprs=dict(source.constants), attrs=dict(source.attrs),
                      options=dict(make_backend(gpu).parse_options(options).__dict__),
                      target=(gpu.backend, gpu.arch, gpu.warp_size), cache_key=fn.cache_key,
                      source_digest=hashlib.sha256(fn.src.encode("utf-8")).hexdigest())


def distinct_launches(trace: Trace) -> list[KernelLaunch]:
    """One launch per compiled variant (kernel, argument types, constants, options)."""
    seen: dict[object, KernelLaunch] = {}
    for launch in trace.launches():
        key = (launch.kernel, launch.options.get("num_warps"), launch.options.get("num_stages"),
               tuple(sorted((k, _variant(v)) for k, v in launch.arguments.items())))
        seen.setdefault(key, launch)
    return list(seen.values())


def _variant(value):
    if isinstance(value, TensorArg):
        return ("tensor", str(value.dtype), value.aligned)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31)
    if isinstance(value, float):
        return "float"
    return repr(value)


def compile_trace(trace: Trace, target: Target) -> list[KernelReport]:
    """Compile every distinct launch of `trace` for `target`."""
    return [compile_launch(launch, target) for launch in distinct_launches(trace)]
