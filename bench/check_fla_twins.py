"""Check that bench.py compares like with like: each fla op it times beside an attnc spec
(FLA_TWINS for training, FLA_DECODE_TWINS for decode) computes the same recurrence on the
same data, against the spec's fp64 reference.

    python bench/check_fla_twins.py            # on a GPU, or on the CPU through Triton's
                                               # interpreter (needs fla-core and einops)

On the CPU only the decode twins run: fla's chunk kernels do not run in Triton 3.9's
interpreter (an InterpreterError inside them). Both take their arguments from the same
bench._fla_arguments, so the decode check covers the mapping of the data; the chunk
ops' own conventions (scale, gate names) need the GPU run. mamba2's readout adds D * x,
which fla's simple GLA leaves to its caller: the check adds it to fla's output.

A wrong mapping (a gate not scaled, an l2norm left out, a gate passed under the wrong
name) shows as an O(1) relative error; bf16 inputs give ~1e-2. Exit status 1 on a
mismatch or an fla op that fails, 2 without fla.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch  # (does not import Triton, which reads TRITON_INTERPRET when imported)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (this directory's bench.py)

import attnc  # noqa: E402
from attnc.runtime.sampling import random_arguments  # noqa: E402
from attnc.runtime.verify import rel_rms  # noqa: E402

TOLERANCE = 5e-2  # bf16 inputs; a wrong mapping is off by O(1)


def _without_device_benchmarks():
    """Triton's autotuner times its configs through the GPU driver, which the interpreter
    has none of: time nothing and take the first config (values do not depend on it)."""
    from triton.runtime.autotuner import Autotuner

    Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [fn() or 1.0] * 3)


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _skip_term(spec_name, args):
    """What the spec's readout adds beyond fla's op, or None (mamba2: D * x)."""
    if spec_name == "mamba2":
        return args["D"].double()[None, None, :, None] * args["x"].double()
    return None


def check(spec_name: str, device: str, dtype=torch.bfloat16, chunk: bool = True) -> list[str]:
    """Mismatches of spec_name's twins (empty when both agree with the reference);
    `chunk`: also the chunked (training) twin."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = attnc.load(spec_name)
    problems = []
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 64, 2, 64 if device == "cuda" else 16
    dims = {"K": D, "V": D}
    args = random_arguments(op.analysis, B=B, T=T, H=H, dims=dims, dtype=dtype, device=device,
                            generator=gen)
    wide = {n: x.double() for n, x in args.items()}
    if chunk:
        expected, _ = op.reference(**wide)
        fla = bench._fla_call(bench.FLA_TWINS[spec_name], args, spec_name)
        problems += _compare(f"{spec_name} / {bench.FLA_TWINS[spec_name]}", fla, expected, None,
                             _skip_term(spec_name, args))

    step_args = random_arguments(op.analysis, B=B, T=1, H=H, dims=dims, dtype=dtype, device=device,
                                 generator=gen)
    state = torch.randn(B, H, D, D, generator=gen).to(device)
    expected, final = op.reference(**{n: x.double() for n, x in step_args.items()},
                                   initial_state=state.double(), output_final_state=True)
    fla = bench._fla_call(bench.FLA_DECODE_TWINS[spec_name], step_args, spec_name,
                          initial_state=state.clone(), output_final_state=True)
    problems += _compare(f"{spec_name} decode / {bench.FLA_DECODE_TWINS[spec_name]}", fla,
                         expected, final, _skip_term(spec_name, step_args))
    return problems


def _compare(label, fla, expected, final, skip):
    if fla is None:
        return [f"{label}: fla has no such op"]
    try:
        result = fla()
    except Exception as err:  # an op that fails is a finding, reported as one
        return [f"{label}: {type(err).__name__}: {str(err)[:200]}"]
    o = _first(result).double()
    errors = {"o": rel_rms(o if skip is None else o + skip, expected)}
    if final is not None:
        errors["final state"] = rel_rms(result[1].double(), final)
    print(f"{label}: " + ", ".join(f"{k} rel RMS {v:.1e}" for k, v in errors.items()))
    return [f"{label}: {k} rel RMS {v:.1e} > {TOLERANCE}" for k, v in errors.items() if v > TOLERANCE]


def main() -> int:
    try:
        import fla.ops  # noqa: F401
    except Exception as err:
        print(f"fla is not importable here ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        _without_device_benchmarks()
    problems = []
    if device == "cpu":
        print("CPU (Triton's interpreter): decode twins only; the chunk twins need a GPU")
    for spec_name in bench.FLA_TWINS:
        problems += check(spec_name, device, chunk=device == "cuda")
    for problem in problems:
        print("MISMATCH", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
