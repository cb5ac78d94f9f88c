"""Random shapes and launcher configs for the shipped specs, against the fp64 recurrence.

    python tests/fuzz_configs.py --seconds 1800 [--seed 1] [--dtype bf16] [--specs gla kda]

Not part of the suite (pytest collects test_*.py only): it draws cases until the time is
up, each a shipped spec with random B, T, H, K, V, chunk size, varlen packing, initial and
final states, and random overrides of the launchers' config keys (fused_forward,
fused_backward, state_group, num_warps, blocks, whole_chunk, exact_diag, diag_loop; a key a
family does not take is dropped), and checks values, final states and every gradient with
`attnc.runtime.verify.verify` in Triton's interpreter. One line per case; a failure
prints the case, which `verify` reproduces; where the fp32 PyTorch chunk path is as far off on
the same inputs, the case is ill-conditioned (a gradient whose terms nearly cancel, e.g.
mamba2's dA_log at B = H = 1, T = 63), not failed. Exit status 1 if any case failed. With
--dtype bf16, set ATTNC_EMULATE_GPU_DOTS=1 to round the dots as a GPU's tensor cores do.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import traceback
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.runtime.verify import verify  # noqa: E402

SPECS = ("gla", "hgrn2", "rwkv6", "mamba2", "retnet", "linear_attn", "deltanet", "gated_deltanet", "kda",
         "rwkv7", "mamba1")
CONFIG_KEYS = {"fused_backward": [0, 1], "fused_forward": [0, 1], "state_group": [0, 1, 2],
               "num_warps": [2, 4, 8], "block_k": [16, 32, 64], "block_v": [16, 32, 64],
               "whole_chunk": [0, 1], "exact_diag": [0, 1], "diag_loop": [0, 1]}
REFUSED_KEY = re.compile(r"config key '(\w+)': expected")


def draw_case(rng: random.Random, specs, dtype) -> tuple[str, dict]:
    name = rng.choice(specs)
    case = dict(B=rng.choice([1, 2]), T=rng.choice([1, 7, 16, 63, 64, 65, 130, 200, 257]), H=rng.choice([1, 2]),
                K=rng.choice([16, 32, 64, 128]), V=rng.choice([16, 32, 64]), chunk_size=rng.choice([16, 32, 64]),
                initial_state=rng.random() < 0.5, final_state=rng.random() < 0.5, seed=rng.randrange(2**31),
                dtype=dtype)
    if rng.random() < 0.25:
        case["seqlens"] = [rng.randint(1, 150) for _ in range(rng.randint(1, 3))]
    case["config"] = {key: rng.choice(values) for key, values in CONFIG_KEYS.items() if rng.random() < 0.35}
    return name, case


def run_case(op, case) -> str:
    """'ok', or what went wrong. Config keys the op's family refuses are dropped."""
    while True:
        try:
            result = verify(op, backend="triton", **case)
        except ValueError as err:
            refused = REFUSED_KEY.match(str(err))
            if not refused:
                return f"REFUSED {err}"[:300]
            case["config"].pop(refused.group(1))
            continue
        except Exception as err:  # reported with the case, the fuzz goes on
            return f"ERROR {type(err).__name__}: {err}"[:300] + "\n" + traceback.format_exc()[-1500:]
        if result.ok:
            return "ok"
        what, error = result.worst
        # a quantity the fp32 PyTorch chunk path gets as wrong on the same inputs is ill-conditioned
        # there (a per-head weight's gradient summed over few tokens that nearly cancel), not a
        # kernel error
        try:
            torch_error = verify(op, backend="torch", **{**case, "config": None}).errors.get(what, 0.0)
        except Exception:  # no PyTorch chunk path to compare with: the failure stands
            torch_error = 0.0
        if torch_error >= error / 2:
            return f"ok (ill-conditioned: {what} {error:.2e}, the PyTorch chunk path's {torch_error:.2e})"
        return f"FAIL worst {what} {error:.2e} > {result.tolerance:.0e} (PyTorch chunk path {torch_error:.2e})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=SPECS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # mamba1 and rwkv7 say they run on the recurrent kernel
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rng = random.Random(args.seed)
    ops, failed, cases = {}, 0, 0
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        name, case = draw_case(rng, args.specs, dtype)
        if name not in ops:
            ops[name] = attnc.load(name)
        op = ops[name]
        start = time.time()
        status = run_case(op, case)
        cases += 1
        failed += not status.startswith(("ok", "REFUSED"))
        shown = json.dumps({k: v for k, v in case.items() if k != "dtype"})
        print(f"[{time.time() - start:5.1f}s] {status} :: {name} {args.dtype} {shown}", flush=True)
    print(f"{cases} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
