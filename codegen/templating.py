"""The one jinja2 environment every emitter renders its templates with.

Templates live in codegen/templates (package data). The environment is strict (an
undefined name is an error, never an empty string) and trims block tags, so generated
code reads like hand-written code.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


def _tuple_code(items) -> str:
    """Python code of a tuple display: `(a,)`, `(a, b)`."""
    items = list(items)
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["tuple"] = _tuple_code
    env.filters["pyrepr"] = repr
    return env


def template_texts() -> dict[str, str]:
    """Every template's text by file name: what cache keys hash."""
    return {p.name: p.read_text() for p in sorted(TEMPLATES.glob("*.jinja"))}
