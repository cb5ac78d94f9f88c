"""Every environment variable attnc reads, declared once, typed and documented.

Read settings through `settings()`: each attribute reads its variable when asked (so
tests may monkeypatch the environment); nothing else in attnc touches `os.environ` for
its own knobs.
"""
from __future__ import annotations

import os
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
    "ATTNC_CHECK_DECAYS": (bool, True, "check, on each chunked call, the decays a spec cannot prove "
                           "<= 1 (a raw log-gate input such as gated_deltanet's alpha): one host sync "
                           "per call; 0 skips it (never checked while a CUDA graph captures)"),
}


class Settings:
    """The environment, typed: each attribute reads and checks its variable when asked.

    Nothing is cached, so tests may monkeypatch the environment, and a call reads only the
    knobs it uses (a decode step asks for two or three on every token, where each read
    costs about a microsecond)."""

    __slots__ = ()

    @property
    def autotune(self) -> str:
        return _choice("ATTNC_AUTOTUNE", os.environ.get("ATTNC_AUTOTUNE") or "fast", AUTOTUNE_MODES)

    @property
    def cache_dir(self) -> Path:
        cache = os.environ.get("ATTNC_CACHE_DIR")
        if not cache:
            import platformdirs

            cache = platformdirs.user_cache_dir("attnc")
        return Path(cache)

    @property
    def dump_dir(self) -> Path | None:
        dump = os.environ.get("ATTNC_DUMP_DIR")
        return Path(dump) if dump else None

    @property
    def interpret(self) -> bool:
        text = os.environ.get("ATTNC_INTERPRET")
        return _bool(text) if text else _bool(os.environ.get("TRITON_INTERPRET", "0"))

    @property
    def log_level(self) -> str:
        return _log_level(os.environ.get("ATTNC_LOG_LEVEL", "WARNING"))

    @property
    def poison(self) -> bool:
        return _bool(os.environ.get("ATTNC_POISON", "0"))

    @property
    def check_decays(self) -> bool:
        return _bool(os.environ.get("ATTNC_CHECK_DECAYS", "1"))


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def settings() -> Settings:
    return Settings()


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
