"""Mutated shipped specs through `attnc.compile`: a located SpecError, or a correct op.

    python tests/fuzz_specs.py --seconds 600 [--seed 1] [--specs gla kda] [--verbose]

Not part of the suite (pytest collects test_*.py only): it draws cases until the time is
up, each a shipped spec's text with one to three random mutations: token-level (delete,
duplicate or swap a token; another declared or an undeclared name, a keyword or function
name in place of a name; another operator; a number made 0, negative, huge, 1e400 or
not a number; a line dropped or duplicated; a shape changed; statement keywords swapped;
a tab, CR, form feed, NUL or non-ASCII character inserted; the text truncated; lines
re-indented) and statement-level (a statement moved above what it reads, a state's
decay or update deleted, a gate or decay made to grow, a second state or readout,
a vector state, deep nesting, a state read where it may not be). Each mutant goes
through `attnc.compile` under a per-case time limit and lands in one class:

  rejected        SpecError whose every diagnostic is located (file:line:col) and free
                  of parser internals (lark terminal names, tracebacks)
  accepted        compiled, and on tiny random inputs the PyTorch chunk path
                  (backend="torch") matches the fp64 reference recurrence in values,
                  final states and every gradient (NotChunkParallelWarning allowed)
  refused-decay   compiled, and the call refused a growing decay (the documented check)
  refused-param   compiled, and the call could not evaluate a param default at these dims
  ill-conditioned compiled, off the reference, but the reference itself moves as much
                  when its inputs move by fp32 rounding (or it is not finite)
  read-as-name    one-line text that `compile` takes for a spec name or path
  BAD-MESSAGE     SpecError without a location or with internals in it
  MISMATCH        compiled, and the op disagrees with the reference
  CRASH           any other exception, at compile or at call
  HANG            over the per-case time limit

Each failure prints the mutant (repr per line, so tabs and CRs show), what happened and
the traceback's last frames; the summary lists counts per class and each distinct
failure once (by class, exception type and innermost frame). Exit status 1 if any case
failed. CPU only, and cheap: no Triton kernels run (B = 1, T 16..40, H 1..2, dims 4..8).
"""
from __future__ import annotations

import argparse
import difflib
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNC_AUTOTUNE", "off")
if "ATTNC_CACHE_DIR" not in os.environ:  # mutants never touch the user's kernel cache
    os.environ["ATTNC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-fuzz-specs-")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.dsl import SpecError  # noqa: E402
from attnc.runtime.compiler import NotChunkParallelWarning, shipped_spec_text, shipped_specs  # noqa: E402
from attnc.runtime.sampling import random_arguments  # noqa: E402
from attnc.runtime.verify import rel_rms  # noqa: E402

INTERNALS = ("lark", "Traceback", "__ANON", "Token(", "site-packages", '.py"', "$END",
             "UnexpectedToken", "UnexpectedCharacters", "UnexpectedEOF", "VisitError")
# lark's names for terminals (`NAME` alone is fine: "a spec starts with `attention NAME`")
TERMINAL_NAMES = re.compile(r"\b(_NL|RPAR|LPAR|LSQB|RSQB|COMMA|EQUAL|STAR|SLASH|MINUS|PLUS|MORETHAN|"
                            r"_ATTENTION|_END|_DIMS|_INPUTS|_PARAM|_WEIGHT|_STATE)\b")
LOCATED = re.compile(r"^<spec>:\d+:\d+: error: ", re.MULTILINE)
TOLERANCE = 1e-4  # fp32 PyTorch chunk path against the fp64 reference (runtime/verify.py)
CASE_SECONDS = 20

KEYWORDS = ("attention", "end", "dims", "inputs", "param", "weight", "state",
            "feature", "gate", "decay", "update", "readout")
STATEMENT_KEYWORDS = ("feature", "gate", "decay", "update", "readout")
DECLARATION_KEYWORDS = ("dims", "inputs", "param", "weight", "state")
FUNCTIONS = ("exp", "log", "sigmoid", "logsigmoid", "softplus", "tanh", "relu", "elu", "silu",
             "sqrt", "rsqrt", "abs", "l2norm", "outer", "diag", "sum")
OPERATORS = ("+", "-", "*", "/", "**", "@")
PUNCTUATION = ("(", ")", "[", "]", ",", "=")
NUMBERS = ("0", "0.0", "-1", "-0.5", "1", "2", "1e400", "1e-400", "99999999999999999999999",
           "1e38", "1.5e308", "nan", "inf", "NaN", "1e", ".5", "5.", "0x10", "1_000", "1e+", "-0",
           "0.000000000000000000001", "340282366920938463463374607431768211457", "1/0", "0 ** -1")
UNDECLARED = ("x", "zz", "N", "S2", "_", "q_", "K2", "__row", "_read0", "Dummy", "I", "E", "pi",
              "oo", "nan", "zoo", "Symbol", "lambda", "None", "True", "def", "import", "print",
              "self", "torch", "tl", "sp", "range", "math", "b_q", "w_D", "cot_gate", "x0",
              "KEY", "out", "values", "states", "__class__")
STRANGE_CHARACTERS = ("\t", "\r", "\r\n", "\f", "\v", "\x00", "\u00a0", "\ufeff", "\u2028", "\u0085",
                      "é", "α", "K\u0301", "\U0001F600", "；", "＝", "\\", "`", "'", '"', "$", "?",
                      "!", "~", "^", "&", "|", "%", ":", ";", "{", "}", "<", ">", "#", "\n", " ")
SHAPES = ("[K]", "[V]", "[K, V]", "[V, K]", "[]", "[K, K]", "[V, V]", "[K, V, K]", "[N]", "[K,]",
          "[, K]", "[K V]", "[[K]]", "[1]", "[K][V]", "")
TOKEN = re.compile(r"""(?P<space>[ \t\f]+)|(?P<newline>\r?\n)|(?P<comment>\#[^\n]*)
                       |(?P<number>(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)
                       |(?P<op>\*\*|[-+*/@()\[\],=])|(?P<other>.)""", re.VERBOSE)


# ---------------------------------------------------------------- mutations
def tokens(text: str) -> list[tuple[str, str]]:
    return [(m.lastgroup, m.group()) for m in TOKEN.finditer(text)]


def join(toks) -> str:
    return "".join(value for _, value in toks)


def declared_names(text: str) -> list[str]:
    names = set()
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        if words[0] in ("inputs", "weight", "state", "dims"):
            names.update(re.findall(r"([A-Za-z_]\w*)\s*(?:\[[^\]]*\])?", " ".join(words[1:])))
        elif words[0] in STATEMENT_KEYWORDS + ("param",) and len(words) > 1:
            names.add(words[1])
    return sorted(names - set(KEYWORDS))


def _pick(rng, toks, kinds):
    where = [i for i, (kind, _) in enumerate(toks) if kind in kinds]
    return rng.choice(where) if where else None


def delete_token(rng, text):
    toks = tokens(text)
    i = _pick(rng, toks, ("name", "number", "op", "other", "newline"))
    return text if i is None else join(toks[:i] + toks[i + 1:])


def duplicate_token(rng, text):
    toks = tokens(text)
    i = _pick(rng, toks, ("name", "number", "op", "other"))
    if i is None:
        return text
    glue = [("space", " ")] if rng.random() < 0.5 else []
    return join(toks[:i + 1] + glue + [toks[i]] + toks[i + 1:])


def swap_tokens(rng, text):
    toks = tokens(text)
    solid = [i for i, (kind, _) in enumerate(toks) if kind not in ("space", "comment")]
    if len(solid) < 2:
        return text
    a = rng.randrange(len(solid) - 1)
    b = a + 1 if rng.random() < 0.7 else rng.randrange(len(solid))
    i, j = solid[a], solid[b]
    toks[i], toks[j] = toks[j], toks[i]
    return join(toks)


def replace_name(rng, text):
    toks = tokens(text)
    i = _pick(rng, toks, ("name",))
    if i is None:
        return text
    pool = rng.choice([declared_names(text) or ["q"], UNDECLARED, KEYWORDS, FUNCTIONS,
                       ("K", "V", "S", "q", "k", "v", "a", "o", "scale")])
    toks[i] = ("name", rng.choice(pool))
    return join(toks)


def replace_operator(rng, text):
    toks = tokens(text)
    i = _pick(rng, toks, ("op",))
    if i is None:
        return text
    toks[i] = ("op", rng.choice(OPERATORS + PUNCTUATION + ("", "***", "//", "%", "^", "==", "@@")))
    return join(toks)


def change_number(rng, text):
    toks = tokens(text)
    i = _pick(rng, toks, ("number",))
    if i is None:  # put a number where a name was
        i = _pick(rng, toks, ("name",))
        if i is None:
            return text
    toks[i] = ("number", rng.choice(NUMBERS))
    return join(toks)


def drop_line(rng, text):
    lines = text.splitlines(keepends=True)
    if not lines:
        return text
    del lines[rng.randrange(len(lines))]
    return "".join(lines)


def duplicate_line(rng, text):
    lines = text.splitlines(keepends=True)
    if not lines:
        return text
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i] if lines[i].endswith("\n") else lines[i] + "\n")
    return "".join(lines)


def change_shape(rng, text):
    spots = [m for m in re.finditer(r"\[[^\]\n]*\]", text)]
    if not spots or rng.random() < 0.2:  # give a shapeless name a shape
        names = [m for m in re.finditer(r"(?<=[ ,])([A-Za-z_]\w*)(?=\s*(,|$|#))", text, re.MULTILINE)]
        if not names:
            return text
        m = rng.choice(names)
        return text[:m.end()] + rng.choice(SHAPES) + text[m.end():]
    m = rng.choice(spots)
    return text[:m.start()] + rng.choice(SHAPES) + text[m.end():]


def swap_keyword(rng, text):
    toks = tokens(text)
    i = _pick(rng, [(k if v in KEYWORDS else "x", v) for k, v in toks], ("name",))
    if i is None:
        return text
    old = toks[i][1]
    pool = STATEMENT_KEYWORDS if old in STATEMENT_KEYWORDS and rng.random() < 0.7 else KEYWORDS
    toks[i] = ("name", rng.choice(pool))
    return join(toks)


def insert_character(rng, text):
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(STRANGE_CHARACTERS) + text[i:]


def line_endings(rng, text):
    return text.replace("\n", rng.choice(("\r\n", "\r", "\n\n", "\n\r", " \n", "\t\n", "\u2028")))


def truncate(rng, text):
    return text[:rng.randrange(len(text) + 1)]


def indent(rng, text):
    lines = text.splitlines(keepends=True)
    if not lines:
        return text
    i = rng.randrange(len(lines))
    new_indent = rng.choice(("", " ", "\t", "        ", "\t  ", "\f", "  \u00a0"))
    lines[i] = new_indent + lines[i].lstrip(" \t")
    return "".join(lines)


def _statement_lines(lines):
    return [i for i, line in enumerate(lines) if line.split() and line.split()[0] in STATEMENT_KEYWORDS]


def move_statement_up(rng, text):
    lines = text.splitlines(keepends=True)
    statements = _statement_lines(lines)
    if not statements:
        return text
    i = rng.choice(statements)
    start = next((j for j, line in enumerate(lines) if line.strip().startswith("attention")), 0) + 1
    j = rng.randrange(start, i + 1) if i >= start else i
    lines.insert(j, lines.pop(i))
    return "".join(lines)


def move_statement_down(rng, text):
    lines = text.splitlines(keepends=True)
    statements = _statement_lines(lines)
    if not statements:
        return text
    i = rng.choice(statements)
    end = max(j for j, line in enumerate(lines) if line.strip() and line.strip() != "end") + 1
    lines.insert(rng.randrange(i, end), lines.pop(i))
    return "".join(lines)


def delete_state_rewrite(rng, text):
    lines = text.splitlines(keepends=True)
    rewrites = [i for i, line in enumerate(lines) if line.split()[:1] in (["decay"], ["update"])]
    if not rewrites:
        return text
    del lines[rng.choice(rewrites)]
    return "".join(lines)


GROWTH = (
    lambda e: f"exp({e})", lambda e: f"({e}) * 2", lambda e: f"1 / ({e})", lambda e: f"({e}) + 1",
    lambda e: f"-({e})", lambda e: f"({e}) ** 2", lambda e: f"({e}) ** -1", lambda e: f"exp(-({e}))",
    lambda e: f"({e}) * ({e})", lambda e: f"sqrt({e})", lambda e: f"log({e})", lambda e: f"abs({e})",
    lambda e: f"({e}) * 0", lambda e: f"({e}) - ({e})", lambda e: f"({e}) ** 0.5", lambda e: f"({e}) / 0",
    lambda e: f"({e}) ** 1e400", lambda e: f"({e}) * 1e400", lambda e: f"({e}) ** ({e})",
    lambda e: f"({e}) ** 3 ** 3 ** 3", lambda e: f"sum({e})", lambda e: f"tanh({e})",
)


def grow_expression(rng, text):
    """Wrap the right-hand side of a gate, decay, feature or update in a growing function."""
    lines = text.splitlines(keepends=True)
    spots = [i for i, line in enumerate(lines)
             if line.split()[:1] in (["gate"], ["decay"], ["feature"], ["update"], ["readout"], ["param"])
             and "=" in line]
    if not spots:
        return text
    i = rng.choice(spots)
    head, _, tail = lines[i].partition("=")
    body, newline = tail.split("#")[0].rstrip("\n"), "\n" if lines[i].endswith("\n") else ""
    body = body.strip()
    if rng.random() < 0.5 and " * " in body:  # decay `a * S` -> `f(a) * S`
        left, _, right = body.partition(" * ")
        body = f"{rng.choice(GROWTH)(left)} * {right}"
    elif rng.random() < 0.5 and "(" in body:  # inside the first call: `diag(a)` -> `diag(f(a))`
        name, _, rest = body.partition("(")
        inner, _, after = rest.partition(")")
        body = f"{name}({rng.choice(GROWTH)(inner)}){after}"
    else:
        body = rng.choice(GROWTH)(body)
    lines[i] = f"{head}= {body}{newline}"
    return "".join(lines)


def deep_nesting(rng, text):
    lines = text.splitlines(keepends=True)
    spots = [i for i, line in enumerate(lines) if line.split()[:1] in (["feature"], ["gate"], ["readout"])]
    if not spots:
        return text
    i = rng.choice(spots)
    head, _, tail = lines[i].partition("=")
    body = tail.split("#")[0].strip()
    depth = rng.choice((50, 200, 500, 1000, 3000, 10000))
    style = rng.randrange(4)
    if style == 0:
        body = "(" * depth + body + ")" * depth
    elif style == 1:
        body = "-" * depth + body
    elif style == 2:
        body = "exp(" * depth + body + ")" * depth
    else:
        body = " + ".join([body] * min(depth, 2000))
    lines[i] = f"{head}= {body}\n"
    return "".join(lines)


def add_declaration(rng, text):
    """A second state, readout, weight, param, input or dim beside the spec's own."""
    extra = rng.choice((
        "  state z[K]\n  update z = z + k\n",
        "  state z[K]\n  update z = z + k\n  readout n = q @ z\n",
        "  state Z[K, V]\n  update Z = Z + outer(k, v)\n  readout p = q @ Z\n",
        "  state Z[K, V]\n  update Z = S + outer(k, v)\n  readout p = q @ Z\n",
        "  state Z[K, V]\n  update Z = Z + S\n  readout p = q @ Z\n",
        "  state c\n  update c = c + 1\n  readout n = c * q\n",
        "  state c\n  decay c = 0.5 * c\n  update c = c + sum(k)\n  readout n = c\n",
        "  readout p = sum(q @ S)\n",
        "  readout p = q @ S @ diag(v)\n",
        "  readout p = (q @ S) / (q @ S + 1)\n",
        "  readout p = exp(q @ S)\n",
        "  readout p = q @ (S @ diag(v))\n",
        "  readout p = q @ S * (q @ S)\n",
        "  readout p = outer(q, v) @ diag(v)\n",
        "  readout p = l2norm(q @ S)\n",
        "  readout p = q @ outer(k, v)\n",
        "  readout p = (S @ diag(v)) * 2\n",
        "  readout p = S\n",
        "  readout p = 1\n",
        "  readout p = sum(S)\n",
        "  decay S = S * S\n",
        "  decay S = diag(k) @ S @ diag(v)\n",
        "  update S = S - outer(k, k @ S)\n",
        "  update S = S + outer(k, k) @ S\n",
        "  update S = outer(k, v)\n",
        "  update S = 0 * S\n",
        "  update S = S + S\n",
        "  update S = S @ diag(exp(v))\n",
        "  update S = diag(exp(k)) @ S\n",
        "  update S = exp(S)\n",
        "  update S = S / 2\n",
        "  update S = S ** 2\n",
        "  update S = l2norm(k) * 0 + S\n",
        "  weight w2[K, V]\n",
        "  weight w3\n  param p3 = 2\n",
        "  param p3 = K * V ** 2\n",
        "  param p3 = 1 / (K - K)\n",
        "  param p3 = K ** 1e400\n",
        "  gate g2 = exp(k)\n",
        "  feature f2 = sum(k) * q\n",
        "  dims N\n  inputs n[N]\n",
    ))
    lines = text.splitlines(keepends=True)
    ends = [i for i, line in enumerate(lines) if line.strip() == "end"]
    at = ends[-1] if ends and rng.random() < 0.8 else rng.randrange(len(lines) + 1)
    lines.insert(at, extra)
    return "".join(lines)


def vector_state(rng, text):
    return re.sub(r"state(\s+)S\[K, V\]", r"state\1S[" + rng.choice(("K", "V", "V, K", "K, K", "")) + "]",
                  text, count=1)


def swap_outer(rng, text):
    spots = [m for m in re.finditer(r"outer\(([^(),]+), ([^(),]+)\)", text)]
    if not spots:
        return text
    m = rng.choice(spots)
    return text[:m.start()] + f"outer({m.group(2)}, {m.group(1)})" + text[m.end():]


def splice_spec(rng, text):
    """A line from another shipped spec."""
    other = shipped_spec_text(rng.choice(shipped_specs())).splitlines(keepends=True)
    lines = text.splitlines(keepends=True)
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(other))
    return "".join(lines)


MUTATIONS = [delete_token, duplicate_token, swap_tokens, replace_name, replace_name, replace_operator,
             change_number, change_number, drop_line, duplicate_line, change_shape, swap_keyword,
             insert_character, line_endings, truncate, indent, move_statement_up, move_statement_down,
             delete_state_rewrite, grow_expression, grow_expression, grow_expression, deep_nesting,
             add_declaration, add_declaration, vector_state, swap_outer, splice_spec]


def mutate(rng: random.Random, text: str) -> tuple[str, list[str]]:
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        mutation = rng.choice(MUTATIONS)
        text = mutation(rng, text)
        applied.append(mutation.__name__)
    return text, applied


# ---------------------------------------------------------------- running one mutant
class CaseTimeout(BaseException):
    """The case ran past its time limit (a BaseException, so no `except Exception` eats it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


def _innermost(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _last_frames(error: BaseException, count: int = 6) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    text = "".join(lines)
    frames = text.split("\n  File ")
    return ("  File " + "\n  File ".join(frames[-count:])) if len(frames) > 1 else text


def spec_error_problem(error: SpecError, text: str) -> str | None:
    """What is wrong with a SpecError's message, or None if it is located, shows the line
    it points at (as the parser counts lines: at "\n" only) and is clean."""
    message = str(error)
    leaked = [internal for internal in INTERNALS if internal in message]
    leaked += TERMINAL_NAMES.findall(message)
    if leaked:
        return f"internal names in the message: {leaked}"
    if not error.diagnostics:
        return "no diagnostics"
    for diagnostic in error.diagnostics:
        rendered = diagnostic.render()
        if diagnostic.span is None or not LOCATED.match(rendered):
            return f"a diagnostic without file:line:col: {rendered.splitlines()[0]!r}"
        lines = text.split("\n")
        line = lines[diagnostic.span.line - 1] if 1 <= diagnostic.span.line <= len(lines) else ""
        if line.strip() and not diagnostic.source_line.strip():
            return f"a diagnostic without its source line: {rendered.splitlines()[0]!r}"
        if len(diagnostic.source_line) != len(line.rstrip("\r")):
            return f"a diagnostic showing another line than {diagnostic.span.line}: {rendered!r}"
    return None


def _leaves_and_outputs(op, args, h0, backend):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    states = tuple(s.detach().clone().requires_grad_() for s in h0)
    state_arg = states[0] if len(states) == 1 else (states or None)
    if backend == "reference":
        leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
        states = tuple(s.detach().double().requires_grad_() for s in states)
        state_arg = states[0] if len(states) == 1 else (states or None)
        out, ht = op.reference(**leaves, initial_state=state_arg, output_final_state=True)
    else:
        out, ht = op(**leaves, initial_state=state_arg, output_final_state=True, backend="torch",
                     chunk_size=16, precision="ieee")
    out = out if isinstance(out, tuple) else (out,)
    ht = ht if isinstance(ht, tuple) else (ht,)
    return leaves, states, out + ht


def _values_and_grads(op, args, h0, backend, cotangent_seed):
    leaves, states, got = _leaves_and_outputs(op, args, h0, backend)
    names = [f"{o}" for o in op.spec.outputs] + [f"final {s.name}" for s in op.spec.states]
    gen = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(g.shape, generator=gen, dtype=torch.float64) for g in got]
    inputs = list(leaves.values()) + list(states)
    differentiable = [g for g in got if g.requires_grad]
    grads = [None] * len(inputs)
    if differentiable:
        grads = torch.autograd.grad([g for g in got if g.requires_grad],
                                    inputs, [c.to(g.dtype) for c, g in zip(cotangents, got) if g.requires_grad],
                                    allow_unused=True)
    values = dict(zip(names, got))
    for name, grad in zip(list(leaves) + [f"initial {s.name}" for s in op.spec.states], grads):
        values[f"d({name})"] = grad
    return values


def compare(op, rng: random.Random) -> tuple[str, str]:
    """(class, detail) of one compiled op run on tiny random inputs."""
    T, H = rng.randint(16, 40), rng.choice((1, 2))
    dims = {d.name: rng.randint(4, 8) for d in op.spec.dims}
    seed = rng.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    args = random_arguments(op.analysis, B=1, T=T, H=H, dims=dims, generator=gen)
    h0 = tuple(torch.randn(1, H, *(dims[d] for d in s.shape), generator=gen) for s in op.spec.states)
    case = f"T={T} H={H} dims={dims} seed={seed}"
    try:
        got = _values_and_grads(op, args, h0, "torch", seed)
    except ValueError as error:
        if "decays by exp(" in str(error):
            return "refused-decay", case
        if "cannot evaluate the default" in str(error):  # `param p = 1 / (K - K)`: only the dims tell
            return "refused-param", f"{case}: {error}"
        raise
    want = _values_and_grads(op, args, h0, "reference", seed)
    # the reference on inputs moved by fp32 rounding: how far the answer itself moves
    nudge = torch.Generator().manual_seed(seed + 1)
    moved_args = {n: t * (1 + 2e-7 * torch.randn(t.shape, generator=nudge)) for n, t in args.items()}
    moved_h0 = tuple(s * (1 + 2e-7 * torch.randn(s.shape, generator=nudge)) for s in h0)
    moved = _values_and_grads(op, moved_args, moved_h0, "reference", seed)
    worst, ill = None, []
    values = [want[n] for n in [*op.spec.outputs, *(f"final {s.name}" for s in op.spec.states)]]
    if not all(torch.isfinite(v).all() for v in values):  # (log of a negative input, say)
        return "ill-conditioned", f"{case}: the reference's values are not finite"
    for name, expected in want.items():
        actual = got.get(name)
        if expected is None:
            continue
        if not torch.isfinite(expected).all():
            ill.append(f"{name} (reference not finite)")
            continue
        if actual is None:
            if expected.abs().max() > 0:
                worst = max(worst or (0, ""), (float("inf"), f"{name}: no gradient, reference has one"))
            continue
        if actual.shape != expected.shape:
            return "MISMATCH", f"{case}: {name} shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
        error = rel_rms(actual, expected)
        if error <= TOLERANCE:
            continue
        sensitivity = rel_rms(moved[name], expected) if moved.get(name) is not None else float("inf")
        if error <= 100 * sensitivity or expected.abs().max() > 1e30:
            ill.append(f"{name} {error:.1e} (reference moves {sensitivity:.1e})")
            continue
        worst = max(worst or (0, ""), (error, f"{name} {error:.2e} (reference moves {sensitivity:.1e})"))
    if worst is not None:
        return "MISMATCH", f"{case}: worst {worst[1]}"
    if ill:
        return "ill-conditioned", f"{case}: {', '.join(ill)}"
    return "accepted", case


def run_mutant(text: str, rng: random.Random) -> tuple[str, str, BaseException | None]:
    """(class, detail, exception) of one mutant."""
    stage = "compile"
    signal.alarm(CASE_SECONDS)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                op = attnc.compile(text)
            except SpecError as error:
                problem = spec_error_problem(error, text)
                return ("BAD-MESSAGE", f"{problem}\n{error}", None) if problem else ("rejected", "", None)
            except (ValueError, FileNotFoundError) as error:
                if "\n" not in text and ("no shipped spec named" in str(error) or "no spec file" in str(error)):
                    return "read-as-name", str(error)[:80], None
                raise
            chunk = not any(issubclass(w.category, NotChunkParallelWarning) for w in caught)
            stage = "call"
            kind, detail = compare(op, rng)
            return kind, f"[{op.cls}{'' if chunk else ', not chunk-parallel'}] {detail}", None
    except CaseTimeout as error:
        return "HANG", f"over {CASE_SECONDS} s at {stage}", error
    except RecursionError as error:
        return "CRASH", f"at {stage}: RecursionError", error
    except Exception as error:  # every other exception is a bug: reported, the fuzz goes on
        return "CRASH", f"at {stage}: {type(error).__name__}: {str(error)[:300]}", error
    finally:
        signal.alarm(0)


def show_mutant(original: str, text: str) -> str:
    diff = difflib.unified_diff(original.splitlines(), text.splitlines(), "shipped", "mutant", n=0, lineterm="")
    shown = "\n".join(repr(line)[1:-1] if i >= 2 else line for i, line in enumerate(diff))
    if len(shown) > 3000:
        shown = shown[:3000] + f"\n... ({len(shown) - 3000} more characters)"
    return shown or "(no line differs: a change in line endings or trailing text)"


FAILURES = ("BAD-MESSAGE", "MISMATCH", "CRASH", "HANG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specs", nargs="+", default=None, help="shipped specs to mutate (default: all)")
    parser.add_argument("--verbose", action="store_true", help="one line per case, not only failures")
    parser.add_argument("--save", type=Path, default=None,
                        help="also write each failing mutant to DIR/case-N.attn, for reproducing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    signal.signal(signal.SIGALRM, _alarm)
    names = args.specs or shipped_specs()
    originals = {name: shipped_spec_text(name) for name in names}
    rng = random.Random(args.seed)
    counts: dict[str, int] = {}
    distinct: dict[tuple, tuple[int, str]] = {}
    cases = 0
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        name = rng.choice(names)
        text, applied = mutate(rng, originals[name])
        if text == originals[name]:
            counts["unchanged"] = counts.get("unchanged", 0) + 1
            continue
        case_rng = random.Random(rng.randrange(2**63))
        start = time.time()
        kind, detail, error = run_mutant(text, case_rng)
        cases += 1
        counts[kind] = counts.get(kind, 0) + 1
        if args.verbose or kind in FAILURES:
            print(f"[case {cases} {time.time() - start:5.2f}s] {kind} :: {name} {'+'.join(applied)} "
                  f"{detail.splitlines()[0] if detail else ''}", flush=True)
        if kind in FAILURES:
            where = _innermost(error) if error is not None else detail.splitlines()[0][:60]
            key = (kind, type(error).__name__ if error is not None else "", where)
            print(show_mutant(originals[name], text))
            print("mutant repr:", repr(text)[:2000])
            if detail and len(detail.splitlines()) > 1:
                print(detail)
            if error is not None and not isinstance(error, CaseTimeout):
                print(_last_frames(error))
            print("-" * 80, flush=True)
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"case-{cases}.attn").write_bytes(text.encode("utf-8", "surrogatepass"))
            if key not in distinct:
                distinct[key] = (cases, detail.splitlines()[0] if detail else "")
    print(f"\n{cases} mutants in {args.seconds:.0f} s (seed {args.seed}):")
    for kind in sorted(counts, key=lambda k: (k in FAILURES, k)):
        print(f"  {kind:16s} {counts[kind]}")
    if distinct:
        print(f"{len(distinct)} distinct failures (class, exception, innermost frame; first case):")
        for (kind, exc, where), (case, detail) in distinct.items():
            print(f"  {kind} {exc} at {where} (case {case}): {detail[:200]}")
    failed = sum(counts.get(kind, 0) for kind in FAILURES)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
