"""Test setup: on a machine without a GPU, generated Triton kernels run in Triton's
interpreter, which must be switched on before triton is first imported."""
import os

if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run many small ops, for which a second intra-op thread only adds hand-offs;
# on a machine whose other core is busy it made them 40x slower.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own kernel cache so tests never see each other's entries."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "attnc-cache"))
    monkeypatch.setenv("ATTNC_POISON", "1")  # unwritten kernel outputs show as NaN
    # Every test starts with an empty cache, so on a GPU each would tune its shapes first;
    # tests check the kernels at their defaults, and tests/test_autotune.py tunes on purpose.
    monkeypatch.setenv("ATTNC_AUTOTUNE", "off")
    torch.manual_seed(0)


@pytest.fixture
def gpu_operand_storage(monkeypatch):
    """`force(module, record)`: make a rendered chunk module store its dot-operand buffers
    in bf16, as it does on a GPU (the interpreter's dots are fp32, so there it stores them
    in fp32), and call `record(shape, dtype)` for every buffer its plans allocate."""
    def force(module, record):
        class GpuStoragePlan(module._Plan):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.operand_dtype = torch.bfloat16

            def new(self, *shape, dtype=torch.float32):
                record(shape, dtype)
                return super().new(*shape, dtype=dtype)

        monkeypatch.setattr(module, "_Plan", GpuStoragePlan)
    return force


@pytest.fixture
def record_launches(monkeypatch):
    """`with record_launches() as names:` the names of the Triton kernels launched within,
    in order (they still run)."""
    import contextlib

    from triton.runtime.jit import KernelInterface

    @contextlib.contextmanager
    def recording():
        names = []
        launch_as_defined = KernelInterface.__getitem__

        def launch(kernel, grid):
            names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
            return launch_as_defined(kernel, grid)

        monkeypatch.setattr(KernelInterface, "__getitem__", launch)
        try:
            yield names
        finally:
            monkeypatch.setattr(KernelInterface, "__getitem__", launch_as_defined)
    return recording
