"""Compiled ops go through the kernel cache: the first use on a machine generates and
stores the sources, a later process loads them without generating any code."""
import os
import subprocess
import sys

import torch

import attnc
from attnc.runtime.cache import KernelCache

CHILD = r"""
import sys, torch, attnc
if sys.argv[1] == "forbid":
    import attnc.codegen.emit_torch as emit_torch, attnc.codegen.chunk_diag as chunk_diag
    import attnc.codegen.recurrent as recurrent
    def refuse(*a, **k):
        raise RuntimeError("code generation on a warm start")
    emit_torch.emit_plan = refuse
    chunk_diag.render = refuse
    recurrent.render_recurrent = refuse
op = attnc.load("gla")
g = torch.Generator().manual_seed(0)
args = {n: torch.randn(1, 20, 2, 16, generator=g) for n in ("q", "k", "v", "g")}
out, _ = op(**args, backend="torch")
print(float(out.double().square().sum()))
"""


def _child(mode, cache):
    env = dict(os.environ, ATTNC_CACHE_DIR=str(cache))
    run = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    return float(run.stdout.strip().splitlines()[-1])


def test_warm_process_generates_no_code(tmp_path):
    cold = _child("generate", tmp_path)
    entries = KernelCache(tmp_path).list_entries()
    assert len(entries) == 1 and entries[0].spec == "gla"
    assert {"gla_plan.py", "gla_S_kernels.py", "gla_recurrent.py", "manifest.json"} <= set(
        entries[0].files)
    warm = _child("forbid", tmp_path)
    assert warm == cold
    assert len(KernelCache(tmp_path).list_entries()) == 1


def test_cache_key_tracks_what_changes_output():
    gla, rwkv6 = attnc.load("gla"), attnc.load("rwkv6")
    assert gla.cache_key() != rwkv6.cache_key()
    assert gla.cache_key() == attnc.load("gla").cache_key()
    # a comment is not part of the key; a changed statement is
    text = attnc.runtime.compiler.shipped_spec_text("gla")
    assert attnc.compile("# another comment\n" + text).cache_key() == gla.cache_key()
    changed = attnc.compile(text.replace("/ 16", "/ 8"))
    assert changed.cache_key() != gla.cache_key()


def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    args = {n: torch.randn(1, 20, 2, 16) for n in ("q", "k", "v", "g")}
    expected, _ = attnc.load("gla")(**args, backend="torch")
    (entry,) = KernelCache(tmp_path).list_entries()
    plan = entry.files["gla_plan.py"]
    plan.write_text(plan.read_text()[:100])      # truncated
    with caplog.at_level("WARNING", logger="attnc"):
        out, _ = attnc.load("gla")(**args, backend="torch")
    assert torch.equal(out, expected)
    assert any(entry.key[:12] in r.getMessage() for r in caplog.records)


def test_compile_emit_writes_readable_sources(tmp_path):
    from attnc.runtime.cli import main

    assert main(["compile", "rwkv6", "--emit", str(tmp_path)]) == 0
    plan = (tmp_path / "rwkv6_plan.py").read_text()
    kernels = (tmp_path / "rwkv6_S_kernels.py").read_text()
    assert "def epilogue_backward" in plan and "exclusive=True" in plan  # (no prologue: r, k, v as given)
    assert "def rwkv6_S_chunk_state_fwd" in kernels
    compile(plan, "rwkv6_plan.py", "exec")
    compile(kernels, "rwkv6_S_kernels.py", "exec")
