"""The benchmark harness runs end to end on the CPU (tiny shapes): every variant gets
numbers, nothing errors, and the results file is written. Real numbers need a GPU."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "cpu-smoke.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "error" in header
    names = [r.split("|")[1].strip() for r in body]
    for variant in ("mamba2", "gla", "deltanet", "gated_deltanet", "kda",
                    "softmax attention (causal)", "gla decode step"):
        assert variant in names, names
    assert header.rstrip(" |").endswith("error")
    for r in body:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[-1] == "", f"row reports an error: {r}"
