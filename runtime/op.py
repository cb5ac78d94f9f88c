"""The compiled-op object handed back to users."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import types


from ..codegen.analysis import Analysis
from ..dsl import ir
from ..dsl.printer import pretty
from .settings import settings

log = logging.getLogger("attnc")

DEFAULT_CHUNK_SIZE = 64  # when neither the caller nor a tuned config sets one
_MISSING = object()


@functools.cache
def _calls():
    """What every call needs from torch and the runtime, imported on the first call (not
    with attnc, which the CLI imports without torch) and then found at no cost: a
    function-level import costs ~1 us, and a decode step is tens of us."""
    import torch

    from . import autotune
    from .binding import bind, expand_heads
    from .kernels import DecayError, decay_check, on_gpu_path
    from .recurrent_op import step

    return types.SimpleNamespace(torch=torch, bind=bind, expand_heads=expand_heads,
                                 on_gpu_path=on_gpu_path, step=step, autotune=autotune,
                                 decay_check=decay_check, DecayError=DecayError)


class CompiledOp:
    """One compiled spec: `op(...)` runs kernels; `op.reference(...)` the fp64 oracle.

    Call contract (both): keyword tensors named as the spec's inputs and weights,
    inputs [B, T, H, dim] (per-token scalars [B, T, H]), weights [H, *dims], params as
    floats; `initial_state` ([N, H, *state dims], one per state), `output_final_state`,
    `cu_seqlens` (varlen, B = 1). Returns `(outputs, final_state)`; each is a single
    tensor when the spec has one output / one state, else a tuple.
    """

    def __init__(self, spec: ir.Spec, analysis: Analysis):
        self.spec = spec
        self.analysis = analysis
        self._plan_modules: dict = {}  # torch.device -> loaded plan module
        self._tuned_configs: dict = {}  # (torch.device, shape bucket) -> tuned config
        # (torch.device, the sizes a shape bucket is made of) -> its tuned config, so that a
        # repeated call shape finds its config without formatting the bucket
        self._configs_by_sizes: dict = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @functools.cached_property
    def _unproven_decays(self) -> tuple:
        """(state, log gate, a function returning its torch function) for each decay of a
        chunked state that sympy cannot prove <= 1 (log gate <= 0): the chunk forms assume
        decays (CHUNKFORMS.md), so their values are checked per call. The torch function is
        made when first needed: the first lambdify of a process took 1.4 s on the 2-core
        CPU machine, and where the kernels check the gate only an error needs it."""
        return tuple((form.name, gate, functools.partial(_torch_function, gate)) for form in self.analysis.states
                     for gate in (form.log_gate, form.log_gate_v)
                     if gate is not None and gate.is_nonpositive is not True)

    @functools.cached_property
    def _decays_by_checker(self) -> tuple[tuple, tuple]:
        """The unproven decays split by who checks them on the "triton" backend: ((state,
        message) of each K-side log gate that the state's chunk kernels check as they
        cumulate it, ChunkCall.kernels_check_decays), and the others' entries, which a
        PyTorch reduction checks (runtime/op.py _check_decays)."""
        from ..codegen.plan import plan_chunks

        checking = {call.state for call in plan_chunks(self.analysis).calls if call.kernels_check_decays}
        k_gates = {form.name: form.log_gate for form in self.analysis.states}
        in_kernels = tuple(d for d in self._unproven_decays if d[0] in checking and d[1] == k_gates[d[0]])
        return (tuple((state, _decay_message(self.spec.name, state, gate)) for state, gate, _ in in_kernels),
                tuple(d for d in self._unproven_decays if d not in in_kernels))

    @property
    def cls(self) -> str:
        return self.analysis.cls

    def __repr__(self) -> str:
        return f"<attnc op {self.name}: class {self.cls}>"

    def pretty(self) -> str:
        return pretty(self.spec)

    def reference(self, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                  **kwargs):
        """The fp64 naive recurrence (the oracle): fp64 outputs and final states."""
        from ..codegen.reference import reference as run_reference
        from .binding import bind

        bound = bind(self.spec, kwargs, initial_state=initial_state, cu_seqlens=cu_seqlens)
        outputs, states = run_reference(self.spec, bound, output_final_state=output_final_state)
        return _unwrap(outputs), (_unwrap(states) if states is not None else None)

    def __call__(self, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                 chunk_size: int | None = None, backend: str | None = None,
                 precision: str = "tf32", config: dict | None = None, **kwargs):
        """Run the generated kernels. `backend`: "triton" (default on CUDA, or on the CPU
        when Triton's interpreter is on) or "torch" (the plan in plain PyTorch).
        `precision`: tl.dot precision for fp32 operands on a GPU ("tf32" or "ieee").

        Launch values: on a GPU the chunk kernels run with the config tuned for this device
        and shape bucket, from the config cache or tuned on the first call (ATTNC_AUTOTUNE,
        runtime/autotune.py). `chunk_size` fixes the chunk size (the rest is still tuned
        for it); `config` ({"chunk_size": ..., "num_warps": ..., ...}) fixes everything and
        skips tuning. Without either, and wherever tuning does not apply (the interpreter,
        ATTNC_AUTOTUNE=off), chunks are 64 tokens and the kernels' defaults hold."""
        if _traced():
            return _eagerly(CompiledOp.__call__, self, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                            backend=backend, precision=precision, config=config, **kwargs)
        calls = _calls()
        if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
            raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
        if precision not in ("tf32", "ieee"):
            raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
        bound = calls.bind(self.spec, kwargs, initial_state=initial_state, cu_seqlens=cu_seqlens)
        with _on_device(bound.device):
            return self._call_bound(calls, bound, output_final_state, backend, chunk_size, precision, config)

    def _call_bound(self, calls, bound, output_final_state, backend, chunk_size, precision, config):
        """`__call__` after binding, on the inputs' device."""
        backend = self._backend(bound, backend)
        dtype = bound.stream_dtype
        if self.no_chunk_form is not None:
            return self._recurrent_call(bound, output_final_state, backend, dtype)
        module = self.plan_module(bound.device)

        H = bound.H
        values: dict[str, object] = {}
        for inp in self.spec.inputs:  # [B, T, H, D], scalars get D = 1
            x = calls.expand_heads(bound.inputs[inp.name], H)
            # the fused Triton prologue reads any dtype and computes in fp32; the PyTorch
            # one computes in the tensors' dtype, so it gets fp32 copies
            x = x if backend == "triton" else x.float()
            values[inp.name] = x if inp.shape else x.unsqueeze(-1)
        for w in self.spec.weights:   # [1, 1, H, D]
            x = bound.weights[w.name]
            # (the fused prologue / epilogue read any dtype, and chunk calls convert what
            # they take: no conversion on "triton", where each is an op on the device)
            x = x if backend == "triton" else x.float()
            values[w.name] = x.reshape(1, 1, H, -1) if len(w.shape) <= 1 else x[None, None]
        values.update(bound.params)
        states_in = bound.initial_states or (None,) * len(self.spec.states)
        states_in = tuple(None if s is None else s.float() for s in states_in)

        decay_checks = None
        if self._unproven_decays and settings().check_decays:
            if backend == "triton" and not _capturing(bound.device):
                # the gates the chunk kernels cumulate are checked there, as they load them
                in_kernels, in_torch = self._decays_by_checker
                decay_checks = {state: calls.decay_check(bound.device, message) for state, message in in_kernels}
                _check_decays(self.spec.name, in_torch, values)
            else:
                _check_decays(self.spec.name, self._unproven_decays, values)
        launch = self._launch_values(bound, dtype, backend, chunk_size, config)
        try:
            outputs, states = module.forward(
                values, states_in, shape=(bound.B, bound.T, H),
                output_final_state=output_final_state, cu_seqlens=bound.cu_seqlens, dtype=dtype,
                options=dict(backend=backend, input_precision=precision, **launch), decay_checks=decay_checks,
            )
        except calls.DecayError:  # a kernel found a growing gate (at once, off the GPU): say where
            _check_decays(self.spec.name, self._unproven_decays, values)
            raise
        shapes = {r.name: r.shape for r in self.analysis.readouts}
        outputs = tuple(
            (o if shapes[name] else o.squeeze(-1)).to(dtype)
            for name, o in zip(self.spec.outputs, outputs)
        )
        return _unwrap(outputs), (_unwrap(states) if states is not None else None)

    def _launch_values(self, bound, dtype, backend, chunk_size, config) -> dict:
        """The chunk size and launcher config of one call: the caller's, else tuned."""
        if config is not None:
            config = dict(config)
            fixed = config.pop("chunk_size", None)
            if fixed is not None and chunk_size is not None and fixed != chunk_size:
                raise ValueError(f"chunk_size={chunk_size} contradicts config's chunk_size={fixed}")
            chunk_size = chunk_size or fixed
        elif backend == "triton":
            config = dict(self._tuned_config(bound, dtype, chunk_size) or {})
            tuned_chunk_size = config.pop("chunk_size", None)
            chunk_size = chunk_size or tuned_chunk_size
        return dict(chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, config=config or None)

    def _tuned_config(self, bound, dtype, chunk_size) -> dict | None:
        """The tuned config of this call's device and shape bucket (found in the config
        cache, else tuned now), remembered for the life of the op; None where tuning does
        not apply."""
        autotune = _calls().autotune
        if not autotune.tuning_applies(bound.device):
            return None
        sizes = (bound.device, bound.B, bound.T, bound.H, tuple(bound.dims.values()), dtype, chunk_size,
                 bound.N if bound.cu_seqlens is not None else None)
        config = self._configs_by_sizes.get(sizes, _MISSING)
        if config is not _MISSING:
            return config
        key = (bound.device, autotune.shape_bucket_of(bound, dtype, chunk_size=chunk_size))
        if key not in self._tuned_configs:
            self._tuned_configs[key] = autotune.config_for_call(self, bound, dtype, chunk_size=chunk_size)
        if len(self._configs_by_sizes) >= 256:
            self._configs_by_sizes.clear()
        self._configs_by_sizes[sizes] = self._tuned_configs[key]
        return self._tuned_configs[key]

    @functools.cached_property
    def no_chunk_form(self) -> str | None:
        """Why the spec has no chunk kernels (it then runs on the recurrent kernel), or None."""
        from ..codegen.plan import NoChunkForm, plan_chunks

        try:
            plan_chunks(self.analysis)
            return None
        except NoChunkForm as why:
            return str(why)

    def _recurrent_call(self, bound, output_final_state, backend, dtype):
        """Specs with no chunk form: the fused recurrent kernels (sequential in T), or on
        the "torch" backend the reference recurrence in fp64."""
        if backend == "triton":
            from .recurrent_op import recurrent

            self.plan_module(bound.device)  # the recurrent module, from the kernel cache
            outputs, states = recurrent(self.spec, bound, output_final_state=output_final_state)
        else:
            from ..codegen.reference import reference

            outputs, states = reference(self.spec, bound, output_final_state=output_final_state)
            outputs = tuple(o.to(dtype) for o in outputs)
            states = None if states is None else tuple(s.float() for s in states)
        return _unwrap(outputs), (_unwrap(states) if states is not None else None)

    def step(self, *, state, inplace: bool = False, state_indices=None, cu_seqlens=None,
             backend: str | None = None, **kwargs):
        """Decode T = 1..64 new tokens against cached fp32 states; returns (o, new_state).

        state: the cached states [N, H, *dims] (a tuple when the spec has several), or a
        pool [P, H, *dims] with `state_indices` (int [N]) naming each sequence's row.
        inplace: write the new states into `state`. Runs the spec's fused recurrent
        kernel ("triton") or the reference recurrence ("torch"); no autograd."""
        if _traced():
            return _eagerly(CompiledOp.step, self, state=state, inplace=inplace, state_indices=state_indices,
                            cu_seqlens=cu_seqlens, backend=backend, **kwargs)
        calls = _calls()
        bound = calls.bind(self.spec, kwargs, cu_seqlens=cu_seqlens)
        backend = self._backend(bound, backend)
        states = (state,) if isinstance(state, calls.torch.Tensor) else tuple(state)
        if backend == "triton":
            self.plan_module(bound.device)  # the recurrent module, from the kernel cache
            with _on_device(bound.device):
                outputs, new_states = calls.step(self.spec, bound, states, inplace=inplace,
                                                 state_indices=state_indices)
            return _unwrap(outputs), _unwrap(new_states)
        return self._reference_step(bound, states, inplace, state_indices)

    def _reference_step(self, bound, states, inplace, state_indices):

        import torch

        from ..codegen.reference import reference

        if len(states) != len(self.spec.states):
            raise ValueError(f"{self.name}: expected {len(self.spec.states)} state tensor(s), "
                             f"got {len(states)}")
        rows = state_indices.long() if state_indices is not None else slice(None)
        picked = tuple(s[rows].float() for s in states)
        with torch.no_grad():
            outputs, finals = reference(self.spec, dataclasses.replace(bound, initial_states=picked),
                                        output_final_state=True)
        dtype = bound.stream_dtype
        outputs = tuple(o.to(dtype) for o in outputs)
        if inplace:
            for s, f in zip(states, finals):
                s[rows] = f.to(s.dtype)
            return _unwrap(outputs), _unwrap(states)
        if state_indices is not None:
            pools = tuple(s.float().clone() for s in states)
            for pool, f in zip(pools, finals):
                pool[rows] = f.float()
            return _unwrap(outputs), _unwrap(pools)
        return _unwrap(outputs), _unwrap(tuple(f.float() for f in finals))

    def _backend(self, bound, backend):
        if backend is None:
            return "triton" if _calls().on_gpu_path(bound.device) else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        if backend == "triton" and not _calls().on_gpu_path(bound.device):
            # (Triton itself would fail deep inside the first launch: "0 active drivers")
            raise ValueError(f"backend='triton' with tensors on {bound.device.type}: the Triton kernels run on "
                             "a CUDA GPU, or on the CPU in Triton's interpreter, which needs ATTNC_INTERPRET=1 "
                             "(or TRITON_INTERPRET=1) set before triton is imported; backend='torch' runs the "
                             "same chunk algorithm in PyTorch")
        return backend

    def plan_source(self) -> str:
        """The generated PyTorch plan module (raises NoChunkForm for classes without one)."""
        from .. import __version__
        from ..codegen.emit_torch import emit_plan
        from ..codegen.plan import plan_chunks

        return emit_plan(plan_chunks(self.analysis), __version__)

    def sources(self) -> dict[str, str]:
        """Every generated source of this op by file name: the fused recurrent module
        (decode steps, and training where there is no chunk form), the plan module, its
        fused prologue and epilogue (which the plan loads from beside itself) and one
        Triton module per chunk call where there is, and a manifest of which is which."""
        import json

        from ..codegen import chunk_delta, chunk_diag
        from ..codegen.emit_torch import emit_elementwise
        from ..codegen.plan import plan_chunks
        from ..codegen.recurrent import render_recurrent

        recurrent = f"{self.name}_recurrent.py"
        files = {recurrent: render_recurrent(self.spec)}
        manifest: dict = {"recurrent": recurrent, "plan": None, "elementwise": [], "kernels": {}}
        if self.no_chunk_form is None:
            manifest["plan"] = f"{self.name}_plan.py"
            files[manifest["plan"]] = self.plan_source()
            for module, source in emit_elementwise(plan_chunks(self.analysis)).items():
                files[f"{module}.py"] = source
                manifest["elementwise"].append(f"{module}.py")
            kernels: dict[str, dict] = {"diag": {}, "delta": {}}
            for call, kernel in self.chunk_kernels():
                render = chunk_delta.render if call.kind == "delta" else chunk_diag.render
                files[f"{kernel.name}_kernels.py"] = render(kernel)
                kernels[call.kind][f"{kernel.name}_kernels.py"] = dataclasses.asdict(kernel)
            manifest["kernels"] = kernels
        files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True)
        return files

    def chunk_kernels(self) -> list[tuple[object, object]]:
        """(plan.ChunkCall, kernel spec) of each chunk call: a DeltaKernelSpec for kind
        "delta", else a DiagKernelSpec (raises NoChunkForm for classes without chunk kernels)."""
        from ..codegen import chunk_delta, chunk_diag
        from ..codegen.plan import plan_chunks

        plan = plan_chunks(self.analysis)
        kernels = []
        for call in plan.calls:
            name = call.kernel_name(self.name, len(plan.calls))
            if call.kind == "delta":
                kernel = chunk_delta.DeltaKernelSpec(name=name, gate=call.gate)
            else:
                mapped = {}
                for role, f in (("gate", call.gate_map()), ("query", call.query_map()), ("key", call.key_map())):
                    if f is not None:
                        mapped.update({f"{role}_map": f[0], f"{role}_map_grad": f[1]})
                scalar_map = call.scalar_map(self.analysis)
                kernel = chunk_diag.DiagKernelSpec(name=name, gate=call.gate,
                                                   vgate=call.log_gate_v is not None,
                                                   exclusive=call.exclusive,
                                                   scalar_map=scalar_map and scalar_map[0], **mapped)
            kernels.append((call, kernel))
        return kernels

    @property
    def canonical_text(self) -> str:
        """The spec as canonical text without its comments: what the cache key hashes."""
        return pretty(dataclasses.replace(self.spec, doc=""))

    def cache_key_parts(self, device) -> dict[str, str]:
        from ..codegen.templating import template_texts
        from .cache import describe_device, standard_key_parts

        templates = template_texts()
        return standard_key_parts(self.canonical_text, templates, describe_device(device),
                                  {"family": self.analysis.family})

    def cache_key(self, device="cpu") -> str:
        from .cache import cache_key

        return cache_key(self.cache_key_parts(device))

    def plan_module(self, device="cpu"):
        """The plan module for `device` (None when the spec has no chunk form), from the
        kernel cache: generated and written on the first use on this machine, loaded
        without any code generation after that. Loading also hands the chunk kernels and
        the recurrent module to the ops that run them."""
        if device in self._plan_modules:  # every call asks: answer before any import
            return self._plan_modules[device]
        import json

        import torch

        from .cache import KernelCache, cache_key
        from .loader import load_module
        from .recurrent_op import register_recurrent

        device = torch.device(device)
        if device not in self._plan_modules:
            parts = self.cache_key_parts(device)
            entry = KernelCache().get_or_build(cache_key(parts), parts, self.sources,
                                               spec_name=self.name)

            def load(file):
                return load_module(entry.files[file].read_text(), file[:-3], entry.path)

            manifest = json.loads(entry.files["manifest.json"].read_text())
            register_recurrent(self.spec, load(manifest["recurrent"]))
            for kind, kernels in manifest["kernels"].items():
                for file, fields in kernels.items():
                    register_kernels(kind, fields, load(file))
            plan = manifest["plan"]
            self._plan_modules[device] = load(plan) if plan else None
        return self._plan_modules[device]


def register_kernels(kind: str, fields: dict, module) -> None:
    """Hand a kernel module loaded from the cache to the chunk op that runs it."""
    if kind == "delta":
        from ..codegen.chunk_delta import DeltaKernelSpec
        from .chunk_delta_op import MODULES

        MODULES.register(DeltaKernelSpec(**fields), module)
    else:
        from ..codegen.chunk_diag import DiagKernelSpec, ScalarMapCode
        from .chunk_diag_op import MODULES

        if fields.get("scalar_map") is not None:  # (JSON made its tuples lists)
            fields = {**fields, "scalar_map": ScalarMapCode(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in fields["scalar_map"].items()})}
        MODULES.register(DiagKernelSpec(**fields), module)


@functools.lru_cache(maxsize=256)
def _torch_function(gate):
    """(names, f): the log gate as a function of the named inputs, weights and params,
    evaluated with torch (None where a function has no torch twin here). Made once per
    gate: lambdify takes ~0.4 ms (1.4 s the first time in a process)."""
    import sympy as sp
    import torch
    import torch.nn.functional as F

    functions = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "Abs": torch.abs,
                 "tanh": torch.tanh, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid,
                 "softplus": F.softplus, "relu": torch.relu, "elu": F.elu, "silu": F.silu,
                 "rsqrt": torch.rsqrt}
    # a gate's constant parts reach them as Python numbers (`log(3)` in log(3 * sigmoid(g)))
    functions = {name: _on_tensors(f) for name, f in functions.items()}
    functions["l2norm"] = _l2norm  # vectors: [B, T, H, D]
    unknown = {type(f).__name__ for f in gate.atoms(sp.Function)} - set(functions)
    if unknown:  # lambdify would fail only when called (a NameError)
        log.debug("log gate %s has no torch function here: %s", gate, ", ".join(sorted(unknown)))
        return (), None
    # an integer beyond int64 (a float literal such as 1e38 in sympy) is no torch scalar
    gate = gate.xreplace({n: sp.Float(n) for n in gate.atoms(sp.Integer) if abs(n) > 2**53})
    symbols = sorted(gate.free_symbols, key=lambda symbol: symbol.name)
    try:
        return tuple(symbol.name for symbol in symbols), sp.lambdify(symbols, gate, modules=[functions])
    except (NameError, TypeError) as err:
        log.debug("log gate %s has no torch function here: %s", gate, err)
        return (), None


def _l2norm(x):
    import torch

    from ..codegen.reference import L2NORM_EPS

    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _on_tensors(f):
    """`f`, taking a Python number as a float64 scalar tensor, as torch's functions do not."""
    import torch

    def on_tensors(x):
        return f(x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64))
    return on_tensors


def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (no checks then:
    an assert replayed from a graph would fire long after its call)."""
    import torch

    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_decays(name: str, decays, values: dict) -> None:
    """Raise if a decay the analysis could not prove <= 1 exceeds it on this call's values:
    the chunk forms assume decaying states and would return wrong values (CHUNKFORMS.md).
    `decays`: (state, log gate, () -> (names, function)); `values`: inputs [B, T, H, D], weights,
    params by name. On a GPU the check is an asynchronous device-side assert (no host sync);
    it is left out while a CUDA graph captures."""
    import torch

    for state, gate, torch_function in decays:
        names, function = torch_function()
        # weights ([1, 1, H, D], which on "triton" come in their own dtype) in fp32, as the
        # kernels compute the gate; per-token inputs as they are (no copy of a large input)
        args = [a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16)
                and a.shape[0] * a.shape[1] == 1 else a for a in (values.get(n) for n in names)]
        tensors = [a for a in args if torch.is_tensor(a)]
        if function is None or any(a is None for a in args) or (
                tensors and tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            continue
        log_decay = torch.as_tensor(function(*args))
        message = _decay_message(name, state, gate)
        try:
            # one reduction (a pass over the gate: for a per-channel gate as large as k), then
            # on a GPU an asynchronous device-side assert: the host does not wait for it
            torch._assert_async(log_decay.amax() <= 0, message)
        except RuntimeError:  # raised at once on the CPU: say where
            growing = ~(log_decay <= 0)  # (NaN too)
            where = [int(i) for i in growing.nonzero()[0]] if growing.dim() else []
            value = float(log_decay[tuple(where)])
            raise ValueError(message.replace(": pass", f", but {gate} = {value:.4g}" + (
                f" at index {where} ([batch, token, head, channel])" if where else "") + ": pass", 1)) from None


@functools.lru_cache(maxsize=256)
def _decay_message(name: str, state: str, gate) -> str:
    # made once per (spec, state): printing the sympy gate costs ~10 us, every call asks
    return (f"`{name}`: state `{state}` decays by exp({gate}) per step, which the chunked "
            f"kernels need to be <= 1 ({gate} <= 0, a log-space decay): pass log decays (e.g. "
            f"-softplus(x) or logsigmoid(x)); a growing state has no chunked form. "
            f"ATTNC_CHECK_DECAYS=0 skips this check.")


def _unwrap(values):
    values = tuple(values)
    return values[0] if len(values) == 1 else values


# torch.compile: an op's call is not traced but runs as it does eagerly (autograd included),
# a graph break around it. Traced, the host code (launch plans, the kernel cache, Triton's
# runtime) fails to compile or, as other hand-launched Triton ops have been seen to, gets
# captured wrongly. (attnc does not import torch itself: its spec checks run without it.)

def _traced() -> bool:
    """Whether torch.compile is tracing this call."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _eagerly(method, *args, **kwargs):
    """method(*args, **kwargs), run outside torch.compile's graph."""
    return sys.modules["torch"].compiler.disable(method)(*args, **kwargs)


def _on_device(device):
    """Run on the inputs' GPU. Triton launches on the current CUDA device, which need not
    be the inputs' (a model placed on cuda:1 in a process whose current device is cuda:0):
    make theirs current for the call. (Autograd runs a GPU's backward on a thread whose
    current device is that GPU.)"""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cuda = sys.modules["torch"].cuda
    if device.index is None or device.index == cuda.current_device():
        return contextlib.nullcontext()
    return cuda.device(device)
