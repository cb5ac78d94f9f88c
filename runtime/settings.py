"""Every environment variable attnc reads, declared once, typed and documented.

Read settings through `settings()` (re-read on each call, so tests may monkeypatch the
environment); nothing else in attnc touches `os.environ` for its own knobs. A call reads
the variables and parses them only when their text changed: decode steps call it on
every token, where microseconds count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

AUTOTUNE_MODES = ("off", "fast", "full")

# name -> (type, default, doc)
KNOBS = {
    "ATTNC_AUTOTUNE": (str, "fast", "tune chunk kernels on a miss in the config cache: off | fast "
                       "(a small candidate set) | full (the whole grid); never in the interpreter"),
    "ATTNC_CACHE_DIR": (Path, None, "kernel and config cache (default: the user cache dir)"),
    "ATTNC_DUMP_DIR": (Path, None, "also write every generated kernel source here"),
    "ATTNC_INTERPRET": (bool, None, "run Triton kernels in the interpreter (default: TRITON_INTERPRET)"),
    "ATTNC_LOG_LEVEL": (str, "WARNING", "logging level of the `attnc` logger"),
    "ATTNC_POISON": (bool, False, "NaN-fill kernel outputs before kernels write them (tests)"),
}


@dataclass(frozen=True)
class Settings:
    autotune: str
    cache_dir: Path
    dump_dir: Path | None
    interpret: bool
    log_level: str
    poison: bool


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


# what settings() reads: the knobs, TRITON_INTERPRET behind ATTNC_INTERPRET, and what
# platformdirs places the default cache dir by
_READ = (*KNOBS, "TRITON_INTERPRET", "XDG_CACHE_HOME", "HOME")


def settings() -> Settings:
    get = os.environ.get
    return _parse(tuple(get(name) for name in _READ))


@lru_cache(maxsize=8)
def _parse(texts: tuple[str | None, ...]) -> Settings:
    env = {name: text for name, text in zip(_READ, texts) if text is not None}
    cache = env.get("ATTNC_CACHE_DIR")
    if not cache:
        import platformdirs

        cache = platformdirs.user_cache_dir("attnc")
    interp = env.get("ATTNC_INTERPRET")
    interpret = _bool(interp) if interp else _bool(env.get("TRITON_INTERPRET", "0"))
    dump = env.get("ATTNC_DUMP_DIR")
    return Settings(
        autotune=_choice("ATTNC_AUTOTUNE", env.get("ATTNC_AUTOTUNE", "fast"), AUTOTUNE_MODES),
        cache_dir=Path(cache),
        dump_dir=Path(dump) if dump else None,
        interpret=interpret,
        log_level=_log_level(env.get("ATTNC_LOG_LEVEL", "WARNING")),
        poison=_bool(env.get("ATTNC_POISON", "0")),
    )


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={text!r}: expected one of {', '.join(choices)}")
    return value


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"ATTNC_LOG_LEVEL={text!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


def apply_process_settings() -> None:
    """Once, when attnc is imported: the `attnc` logger's level, and Triton's interpreter
    when ATTNC_INTERPRET asks for it (Triton reads TRITON_INTERPRET at its own import,
    so this only takes effect if triton is not imported yet)."""
    import logging
    import sys

    config = settings()
    logging.getLogger("attnc").setLevel(config.log_level)
    if config.interpret and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def use_compiled_kernels() -> None:
    """For commands that compile kernels for a GPU (`attnc aot`): Triton without its
    interpreter, whatever TRITON_INTERPRET / ATTNC_INTERPRET say. Takes effect only if
    triton is not imported yet (Triton reads the variable at its import)."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.pop("ATTNC_INTERPRET", None)
