"""The benchmark harness runs end to end on the CPU (tiny shapes): every variant gets
numbers, nothing errors, and the results file is written. Real numbers need a GPU."""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import attnc
from attnc.runtime.sampling import random_arguments
from attnc.runtime.verify import rel_rms

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


def _fla_semantics(name, kw, state):
    """fla's ops as their docs define them, naively in fp64 (no fla needed): simple GLA
    (scalar log gate g), GLA (per-channel g / gk), the delta rule and its gated form
    (beta, q and k l2-normalised in the kernel); o_t = scale * q_t^T S_t, scale K^-1/2
    unless given. Returns (o, final state)."""
    q, k, v = (kw[n].double() for n in ("q", "k", "v"))
    if kw.get("use_qk_l2norm_in_kernel"):
        q, k = (x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    g = kw.get("g", kw.get("gk"))
    S = state.double().clone()
    outputs = []
    for t in range(q.shape[1]):
        if g is not None:
            decay = g[:, t].double().exp()
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        if "beta" in kw:
            error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
            S = S + kw["beta"][:, t].double()[..., None, None] * torch.einsum("bhk,bhv->bhkv", k[:, t], error)
        else:
            S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, 1), S


@pytest.mark.parametrize("spec_name", ["mamba2", "gla", "deltanet", "gated_deltanet"])
def test_fla_twins_get_the_same_recurrence(spec_name):
    """bench.py times fla beside attnc on the same data: its argument mapping (gates fla
    takes precomputed, scale, l2norm flags, gk for the fused GLA) must give fla's ops, as
    fla defines them, the spec's recurrence. (bench/check_fla_twins.py runs fla itself.)"""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    op = attnc.load(spec_name)
    gen = torch.Generator().manual_seed(0)
    args = random_arguments(op.analysis, B=2, T=6, H=2, dims={"K": 8, "V": 8}, generator=gen)
    state = torch.randn(2, 2, 8, 8, generator=gen)
    want, want_final = op.reference(**{n: x.double() for n, x in args.items()},
                                    initial_state=state.double(), output_final_state=True)
    seen = {}
    for twins in (bench.FLA_TWINS, bench.FLA_DECODE_TWINS):
        fake = types.ModuleType("fla.ops")
        setattr(fake, twins[spec_name], lambda **kw: seen.update(kw) or _fla_semantics(twins[spec_name], kw, state))
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "fla", types.ModuleType("fla"))
            patch.setitem(sys.modules, "fla.ops", fake)
            o, final = bench._fla_call(twins[spec_name], args, spec_name)()
        if spec_name == "mamba2":   # the readout's D * x, which fla leaves to its caller
            o = o + args["D"].double()[None, None, :, None] * args["x"].double()
        assert ("gk" in seen) == (twins[spec_name] == "fused_recurrent_gla"), sorted(seen)
        # (fp32 data, rounded once more where the mapping computes a gate: ~1e-7)
        assert rel_rms(o, want) < 1e-5 and rel_rms(final, want_final) < 1e-5, twins[spec_name]
        seen.clear()
