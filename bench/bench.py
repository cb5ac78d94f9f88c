"""Benchmark attnc's generated kernels beside flash-linear-attention and FlashAttention.

    python bench/bench.py                      # standard shapes, writes bench/results/<device>.md
    python bench/bench.py --quick              # one shape, fewer variants
    python bench/bench.py --smoke              # CPU smoke test of the harness (tiny shapes)

Timings are medians of triton.testing.do_bench on random bf16 inputs (never zeros), all
variants timed in the same process, side by side. Each forward's "floor" is the bytes
of its inputs and outputs read/written once, over the measured device copy bandwidth.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import attnc
from attnc.runtime.sampling import random_arguments

# attnc spec -> the fla op that computes the same recurrence, and how to call it
FLA_TWINS = {
    "mamba2": "chunk_simple_gla",
    "gla": "chunk_gla",
    "deltanet": "chunk_delta_rule",
    "gated_deltanet": "chunk_gated_delta_rule",
}


def _median_ms(fn, warmup=25, rep=100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def _fla_call(name, args, spec_name):
    """fla's op on the same data (its own argument conventions), or None without fla."""
    try:
        import fla.ops as fops
    except Exception:
        return None
    import torch.nn.functional as F

    fn = getattr(fops, name, None)
    if fn is None:
        return None
    if spec_name == "mamba2":
        dt = F.softplus(args["dt"] + args["dt_bias"][None, None])
        g = (-torch.exp(args["A_log"].float())[None, None] * dt.float())
        k = (args["B"] * dt[..., None]).to(args["B"].dtype)
        return lambda: fn(q=args["C"], k=k, v=args["x"], g=g, scale=1.0)
    if spec_name == "gla":
        g = F.logsigmoid(args["g"].float()) / 16
        return lambda: fn(q=args["q"], k=args["k"], v=args["v"], g=g)
    if spec_name == "deltanet":
        return lambda: fn(q=args["q"], k=args["k"], v=args["v"], beta=args["beta"],
                          use_qk_l2norm_in_kernel=True)
    if spec_name == "gated_deltanet":
        return lambda: fn(q=args["q"], k=args["k"], v=args["v"], g=args["alpha"].float(),
                          beta=args["beta"], use_qk_l2norm_in_kernel=True)
    return None


def bench_variant(spec_name, B, T, H, D, dtype, device, bandwidth):
    op = attnc.load(spec_name)
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims={"K": D, "V": D}, dtype=dtype,
                            device=device)
    grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    row = {"variant": spec_name, "T": T, "B": B, "D": D}

    t0 = time.perf_counter()
    out, _ = op(**args)
    torch.cuda.synchronize()
    row["first call s"] = time.perf_counter() - t0
    row["attnc fwd ms"] = _median_ms(lambda: op(**args))

    def fwd_bwd():
        o, _ = op(**grads)
        o.backward(do)
    do = torch.randn_like(out)
    row["attnc fwd+bwd ms"] = _median_ms(fwd_bwd)
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    row["attnc peak GiB"] = torch.cuda.max_memory_allocated() / 2**30

    io_bytes = sum(t.numel() * t.element_size() for t in args.values()) + out.numel() * out.element_size()
    row["floor ms"] = io_bytes / bandwidth * 1e3
    row["fwd / floor"] = row["attnc fwd ms"] / row["floor ms"]

    fla = _fla_call(FLA_TWINS.get(spec_name, ""), args, spec_name)
    if fla is not None:
        fla()
        row["fla fwd ms"] = _median_ms(fla)
        fla_grads = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
        fla_bwd = _fla_call(FLA_TWINS[spec_name], fla_grads, spec_name)

        def fla_fwd_bwd():
            o = fla_bwd()[0]
            o.backward(do.to(o.dtype))
        row["fla fwd+bwd ms"] = _median_ms(fla_fwd_bwd)
    return row


def bench_sdpa(B, T, H, D, dtype, device):
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, device=device) for _ in range(3))
    f = torch.nn.functional.scaled_dot_product_attention
    return {"variant": "sdpa (flash, causal)", "T": T, "B": B, "D": D,
            "attnc fwd ms": None, "fla fwd ms": None,
            "sdpa fwd ms": _median_ms(lambda: f(q, k, v, is_causal=True))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="*", default=["mamba2", "gla", "retnet", "linear_attn"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = "cuda"
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name().replace(" ", "_")
    bandwidth = copy_bandwidth(device)
    shapes = [(16, 2048, 16, 128)] if args.quick else [
        (16, 2048, 16, 128), (4, 8192, 16, 128), (1, 32768, 16, 128), (16, 2048, 16, 64),
        (16, 2048, 16, 256)]
    rows = []
    for B, T, H, D in shapes:
        for variant in args.variants:
            try:
                row = bench_variant(variant, B, T, H, D, dtype, device, bandwidth)
            except Exception as err:  # a miss is reported as a miss
                row = {"variant": variant, "T": T, "B": B, "D": D, "error": f"{type(err).__name__}: {err}"[:200]}
            rows.append(row)
            print(row, flush=True)
        rows.append(bench_sdpa(B, T, H, D, dtype, device))
        print(rows[-1], flush=True)
    write_results(rows, name, bandwidth, args.out)
    return 0


COLUMNS = ["variant", "B", "T", "D", "attnc fwd ms", "fla fwd ms", "sdpa fwd ms", "attnc fwd+bwd ms",
           "fla fwd+bwd ms", "floor ms", "fwd / floor", "attnc peak GiB", "first call s", "error"]


def write_results(rows, device_name, bandwidth, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# attnc benchmark on {device_name}", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"attnc {attnc.__version__}, python {platform.python_version()}; bf16, H = 16; "
             f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; medians of triton.testing.do_bench.",
             "", "Command: `python bench/bench.py`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{device_name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in sorted({r["variant"] for r in rows}):
        pts = [(r["T"], r.get("attnc fwd ms") or r.get("sdpa fwd ms")) for r in rows
               if r["variant"] == variant and r.get("D") == 128 and (r.get("attnc fwd ms") or r.get("sdpa fwd ms"))]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (B*T = 32768)")
    ax.set_ylabel("forward ms (median)")
    ax.legend()
    ax.set_title(f"attnc forward, bf16, H=16, K=V=128, {device_name}")
    fig.tight_layout()
    fig.savefig(out / f"{device_name}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
