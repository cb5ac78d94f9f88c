"""What the chunk ops share: their backends, tl.dot precisions, the gate-shape check,
launch options, and the registry of rendered kernel modules (rendered and imported on
first use, or handed over already loaded from the kernel cache)."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Hashable

import torch

from .loader import load_module
from .settings import settings

BACKENDS = ("triton", "torch")

# Set while runtime/launches.py records the launches a call would make on a GPU: the
# launchers then choose what they would choose there (compiled kernels, bf16 dots, GPU
# block sizes) although the tensors live on the CPU and no kernel runs.
_AS_ON_GPU = contextvars.ContextVar("attnc_as_on_gpu", default=False)


def interpreted(device: torch.device) -> bool:
    """Whether kernels for tensors on `device` run in Triton's interpreter."""
    if _AS_ON_GPU.get():
        return False
    return device.type != "cuda" or settings().interpret


def on_gpu_path(device: torch.device) -> bool:
    """Whether a call on `device` takes the GPU's path (Triton kernels by default)."""
    return _AS_ON_GPU.get() or device.type == "cuda" or settings().interpret


@contextlib.contextmanager
def as_on_gpu():
    """Within: launchers decide as on a GPU (see runtime/launches.py)."""
    token = _AS_ON_GPU.set(True)
    try:
        yield
    finally:
        _AS_ON_GPU.reset(token)
DOT_PRECISIONS = ("tf32", "tf32x3", "ieee")


def check_backend(backend: str, input_precision: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if input_precision not in DOT_PRECISIONS:
        raise ValueError(f"input_precision={input_precision!r}: expected one of "
                         f"{', '.join(DOT_PRECISIONS)}")


def gate_kind(q: torch.Tensor, g: torch.Tensor | None) -> str:
    """"none", "scalar" or "channel", from the shape of the K-side log gate."""
    if g is None:
        return "none"
    if tuple(g.shape) == tuple(q.shape[:3]):
        return "scalar"
    if tuple(g.shape) == tuple(q.shape):
        return "channel"
    raise ValueError(f"g has shape {tuple(g.shape)}; expected [B, T, H] = {tuple(q.shape[:3])} for a scalar "
                     f"gate or [B, T, H, K] = {tuple(q.shape)} for a per-channel gate")


class DecayError(ValueError):
    """A log gate the chunk forms need <= 0 (a decay) was found above 0, or NaN, by the
    kernel that cumulates it (`DecayCheck`)."""


@dataclass(frozen=True)
class DecayCheck:
    """A check, made by the kernel that cumulates a log gate as it loads it, that every log
    gate is <= 0 (the chunk forms assume decaying states, CHUNKFORMS.md): the kernel clears
    `flag` (int32 [1], 1 until then) where it finds one above 0 or NaN, and `assert_held`
    asserts the flag after it, on a GPU asynchronously (no host sync). No pass of its own
    over the gate, and one PyTorch op (the assert) where a reduction and a comparison ran
    before it (runtime/op.py checks the gates no kernel cumulates that way)."""

    message: str
    flag: torch.Tensor

    def assert_held(self) -> None:
        try:
            torch._assert_async(self.flag, self.message)
        except RuntimeError:  # off the GPU it fails at once: the flag is ready for the next call
            self.flag.fill_(1)
            raise DecayError(self.message) from None


_DECAY_FLAGS: dict[torch.device, torch.Tensor] = {}
_DECAY_CHECKS: dict[tuple[torch.device, str], DecayCheck] = {}


def decay_check(device: torch.device, message: str) -> DecayCheck:
    """A DecayCheck on `device`'s flag (one per device: a growing gate found on a GPU ends
    the process's CUDA context there with the message; off it the flag is set again)."""
    check = _DECAY_CHECKS.get((device, message))
    if check is None:  # (one per message: a call asks on every step of a training loop)
        flag = _DECAY_FLAGS.get(device)
        if flag is None:
            flag = _DECAY_FLAGS[device] = torch.ones(1, dtype=torch.int32, device=device)
        check = _DECAY_CHECKS[(device, message)] = DecayCheck(message, flag)
    return check


def checked_decays(decay_check, log_gates: torch.Tensor) -> None:
    """The torch backend's check: `decay_check`'s message as a DecayError where a log gate
    is above 0 or NaN (None: no check)."""
    if decay_check is not None and not bool((log_gates <= 0).all()):
        raise DecayError(decay_check.message)


@dataclass(frozen=True)
class LaunchOptions:
    """How the rendered launchers run: chunk size, tl.dot precision for fp32 operands,
    interpreter mode (fp32 dots), NaN-poisoned buffers (tests) and a tuned config."""

    chunk_size: int = 64
    input_precision: str = "tf32"
    interpret: bool = False
    poison: bool = False
    # tuned overrides of the launchers' defaults (the module's TUNABLE keys), as sorted
    # (key, value) pairs so that options stay hashable; () runs the defaults
    config: tuple[tuple[str, int], ...] = ()

    @classmethod
    def for_call(cls, device: torch.device, *, chunk_size: int, input_precision: str,
                 poison: bool | None, config: dict | None) -> "LaunchOptions":
        key = (chunk_size, input_precision, interpreted(device),
               settings().poison if poison is None else poison,
               tuple(sorted(config.items())) if config else ())
        options = _OPTIONS.get(key)
        if options is None:  # (a frozen dataclass costs microseconds to make: one per key)
            if len(_OPTIONS) >= 256:
                _OPTIONS.clear()
            options = _OPTIONS[key] = cls(*key)
        return options

    def as_kwargs(self) -> dict:
        return dict(chunk_size=self.chunk_size, interpret=self.interpret,
                    input_precision=self.input_precision, poison=self.poison,
                    config=dict(self.config) or None)


_OPTIONS: dict[tuple, LaunchOptions] = {}


class KernelModules:
    """Rendered kernel modules, one per kernel spec, imported from real files (which
    @triton.jit needs) under `settings().cache_dir / "modules"`, and also written to
    ATTNC_DUMP_DIR when it is set. In the cache the file name carries a digest of the
    source: processes of two attnc versions sharing a cache never overwrite each other's
    module (Triton's interpreter reads a kernel's source from its file when it first runs
    it, so a file rewritten in between gave it another version's kernels)."""

    def __init__(self, render: Callable[[Hashable], str], file_name: Callable[[Hashable], str]):
        self._render = render
        self._file_name = file_name
        self._modules: dict[Hashable, ModuleType] = {}

    def get(self, spec: Hashable) -> ModuleType:
        module = self._modules.get(spec)
        if module is None:
            source = self._render(spec)
            name = self._file_name(spec)
            config = settings()
            if config.dump_dir is not None:
                load_module(source, name, config.dump_dir)
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            module = load_module(source, f"{name}_{digest}", config.cache_dir / "modules")
            self._modules[spec] = module
        return module

    def register(self, spec: Hashable, module: ModuleType) -> None:
        """Use an already loaded module (e.g. from the kernel cache) for `spec`."""
        self._modules[spec] = module
