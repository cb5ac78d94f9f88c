"""`attnc.compile`: the pipeline from spec text to a callable op, one named step each.

    parse -> check -> analyse -> (plan -> emit -> load, per backend, on first call)

`attnc.recurrence` enters the same pipeline from a Python function: trace -> check -> analyse.
"""
from __future__ import annotations

from importlib import resources
import warnings
from pathlib import Path

from ..codegen.analysis import Analysis, analyse
from ..dsl import ir
from ..dsl.parser import parse
from ..dsl.tracer import trace
from .op import CompiledOp


def read_spec(source: str | Path) -> tuple[str, str]:
    """(text, filename) for a path, a shipped spec name, or spec text itself."""
    if isinstance(source, Path):
        return source.read_text(), str(source)
    one_line = not any(c in _LINE_BREAKS for c in source)
    if one_line and source.strip() and not source.lstrip().startswith("attention"):
        path = Path(source)
        if path.suffix == ".attn" or _is_file(path):
            if not _is_file(path):
                raise FileNotFoundError(f"no spec file {source!r}")
            return path.read_text(), str(path)
        return shipped_spec_text(source), f"specs/{source}.attn"
    return source, "<spec>"


# where str.splitlines breaks: text with any of them is spec text, not a name or a path
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _is_file(path: Path) -> bool:
    """Whether `path` names an existing file; False for text no file can have as its name
    (too long, a NUL byte), rather than the OSError or ValueError the OS answers with."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def shipped_specs() -> list[str]:
    """Names of the specs that ship with attnc."""
    folder = resources.files("attnc.specs")
    return sorted(p.name[: -len(".attn")] for p in folder.iterdir() if p.name.endswith(".attn"))


def shipped_spec_text(name: str) -> str:
    names = shipped_specs()
    if name not in names:
        raise ValueError(f"no shipped spec named {name!r}; shipped specs: {', '.join(names)}")
    return resources.files("attnc.specs").joinpath(f"{name}.attn").read_text()


def parse_spec(source: str | Path) -> ir.Spec:
    text, filename = read_spec(source)
    return parse(text, filename)


def compile(source: str | Path) -> CompiledOp:  # noqa: A001 - the public verb
    """Compile a spec (a path, a shipped spec name, or `.attn` text) into an op."""
    spec = parse_spec(source)  # parse + check (raises SpecError)
    return compile_spec(spec)


class NotChunkParallelWarning(UserWarning):
    """The spec compiles to the fused recurrent kernel: correct, but sequential in T."""


def compile_spec(spec: ir.Spec) -> CompiledOp:
    """The steps after a front end: turn a checked spec into an op."""
    analysis: Analysis = analyse(spec)  # compose and classify each state
    op = CompiledOp(spec, analysis)
    if op.no_chunk_form is not None:
        warnings.warn(f"{op.no_chunk_form}. It is not chunk-parallel: it runs on the fused "
                      "recurrent kernel (sequential in T)", NotChunkParallelWarning,
                      stacklevel=_caller_level())
    return op


def _caller_level() -> int:
    """The stacklevel of the first frame outside attnc, so a warning names user code."""
    import sys

    from .. import codegen, dsl, runtime

    packages = (codegen, dsl, runtime, sys.modules["attnc"])
    ours = tuple(str(Path(m.__file__).parent) for m in packages)
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        level, frame = level + 1, frame.f_back
    return level


def recurrence(fn) -> CompiledOp:
    """Decorator: trace a Python function into a checked spec (see dsl/tracer.py) and
    compile it; the result is the same `CompiledOp` that `compile` returns for its text."""
    spec = trace(fn)  # trace + check (raises SpecError at the user's file:line)
    return compile_spec(spec)


def load(name: str) -> CompiledOp:
    """Compile a spec shipped with attnc, e.g. `attnc.load("gla")`."""
    return compile(name) if name in shipped_specs() else compile(shipped_spec_text(name))
