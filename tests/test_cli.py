"""The `attnc` command line: exit codes, located errors, never a traceback."""
import json
import subprocess
import sys

import pytest

import attnc
from attnc.dsl.parser import parse
from attnc.runtime.cli import main

INTERNALS = ("Traceback", "lark", "__ANON", "site-packages", 'File "')


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "attnc.runtime.cli", *args],
                          capture_output=True, text=True)


def test_check_reports_located_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad\n  dims K, V\n  inputs q[K], k[K], v[V]\n  state S[K, V]\n"
                   "  update S = S + outer(v, k)\n  readout o = q @ S\nend\n")
    run = run_cli("check", str(bad), "gla")
    assert run.returncode == 1
    assert f"{bad}:5:" in run.stderr
    assert "^" in run.stderr
    assert "gla: diagonal" in run.stdout          # the good spec is still checked
    for word in INTERNALS:
        assert word not in run.stderr


def test_check_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "syntax.attn"
    bad.write_text("attention x\n  dims K\n  inputs q[K]\n  readout o = q @@ q\nend\n")
    run = run_cli("check", str(bad), str(tmp_path / "missing.attn"), "no_such_spec")
    assert run.returncode == 1
    assert f"{bad}:4:" in run.stderr
    assert "missing.attn" in run.stderr
    assert "no shipped spec named 'no_such_spec'" in run.stderr
    for word in INTERNALS:
        assert word not in run.stderr


def test_check_json(capsys):
    assert main(["check", "--json", "mamba2", "rwkv7"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report] == ["mamba2", "rwkv7"]
    assert report[0]["class"] == "scalar"
    assert report[0]["inputs"] == [{"name": "C", "shape": ["K"]}, {"name": "B", "shape": ["K"]},
                                   {"name": "x", "shape": ["V"]}, {"name": "dt", "shape": []}]
    assert report[0]["states"][0]["shape"] == ["K", "V"]
    assert report[1]["class"] == "dplr"


def test_check_notes_specs_that_are_not_chunk_parallel(capsys):
    assert main(["check", "mamba1"]) == 0
    out = capsys.readouterr().out
    assert "not chunk-parallel" in out and "elementwise" in out


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba1"])
def test_show_prints_text_that_parses_back(name, capsys):
    assert main(["show", name]) == 0
    text = capsys.readouterr().out
    assert parse(text) == attnc.load(name).spec
