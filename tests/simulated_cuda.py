"""CUDA without a GPU: fake ``cuda`` tensors that also compute, on the CPU.

:class:`SimulatedCuda` is a ``FakeTensorMode`` whose every op runs twice: once on fake tensors
(device ``cuda``: PyTorch's own device, shape and dtype rules, and our custom ops' fake
implementations, exactly as ``torch.compile`` sees them on a GPU) and once on real CPU tensors
that each fake tensor carries. The real values serve what the fake ones cannot: a host read
(``.item()``, ``.tolist()``, ``bool``), an output whose shape depends on data (``nonzero``),
and the final check of the results.

So code written for the GPU runs end to end on a CPU-only machine and fails where it would fail
on the GPU: a tensor created on the CPU and mixed with ``cuda`` ones raises PyTorch's
"Expected all tensors to be on the same device"; a fake implementation whose shape or dtype
differs from what the op really returns raises here. Not checked: what a custom op's own body
does. It runs on the CPU values (its inputs' devices and its fake implementation are checked,
not the tensors it creates inside), and so takes its CPU branch, not its CUDA one.

A CPU-only PyTorch has no device guard for CUDA, which indexing and other C++ paths construct:
:func:`register_cuda_device_guard` compiles and loads a no-op one (~2 s).
Never use on a machine with CUDA.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import torch
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
GUARD_SOURCE = pathlib.Path(__file__).with_name("noop_cuda_guard.cpp")
_HOST_READS = (torch.ops.aten._local_scalar_dense.default,)
_TORCH_NAMESPACES = ("aten", "prims", "prim")


def _one_device(func, args) -> None:
    """A custom op's kernel reads every tensor it is given from one device, as PyTorch's own
    ops do, but a custom op's fake does not check it. 0-dim CPU tensors are allowed: our ops
    read them on the host (a policy's index), none passes one to a Triton kernel."""
    tensors = [x for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor)]
    devices = {x.device for x in tensors if x.dim() > 0 or x.device.type != "cpu"}
    if len(devices) > 1:
        raise RuntimeError(f"{func} got tensors on {sorted(map(str, devices))}: one device needed")


def register_cuda_device_guard(build_dir: pathlib.Path) -> None:
    """Give this CPU-only PyTorch a no-op CUDA device guard: compiled into ``build_dir`` with
    the C++ compiler Inductor uses, then loaded (once per process)."""
    if torch.cuda.is_available():
        raise RuntimeError("a simulated CUDA device is for machines without one")
    if any(path.endswith("noop_cuda_guard.so") for path in torch.ops.loaded_libraries):
        return
    from torch.utils import cpp_extension

    library = build_dir / "noop_cuda_guard.so"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-O0", "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(GUARD_SOURCE), "-o", str(library),
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        *(f"-L{path}" for path in cpp_extension.library_paths()), "-lc10",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    torch.ops.load_library(str(library))


def real(tensor):
    """The CPU tensor a simulated one carries (anything else unchanged)."""
    if isinstance(tensor, FakeTensor):
        return tensor.simulated
    if isinstance(tensor, torch.device) and tensor.type == "cuda":
        return CPU
    return tensor


def _from_values(make):
    """``torch.tensor(data)`` reads the tensors in ``data`` below Python dispatch, where fake
    tensors have no values: give it their real ones."""

    def wrapped(data, *args, **kwargs):
        if any(isinstance(x, FakeTensor) for x in tree_flatten(data)[0]):
            data = tree_map(lambda x: real(x).tolist() if isinstance(x, FakeTensor) else x, data)
        return make(data, *args, **kwargs)

    return wrapped


class SimulatedCuda(FakeTensorMode):
    """Fake ``cuda`` tensors with real CPU values (see the module's doc)."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self._inside = False  # dispatching the ops of a fake implementation
        self._makers = {}

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            self._makers[name] = getattr(torch, name)
            setattr(torch, name, _from_values(self._makers[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, make in self._makers.items():
                setattr(torch, name, make)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside:
            return super().__torch_dispatch__(func, types, args, kwargs)
        custom = getattr(func, "namespace", "aten") not in _TORCH_NAMESPACES
        if custom:
            _one_device(func, (args, kwargs))
        with _disable_current_modes():
            real_out = func(*tree_map(real, args), **tree_map(real, kwargs))
        if func in _HOST_READS:
            return real_out
        self._inside = True
        try:
            if isinstance(func, HigherOrderOperator):
                fake_out = func.python_key_table[FakeTensorMode](self, *args, **kwargs)
            else:
                fake_out = super().__torch_dispatch__(func, types, args, kwargs)
        except DataDependentOutputException:  # a host read (bool, equal, ...)
            return real_out
        except DynamicOutputShapeException:  # nonzero and the like: shapes from the real run
            devices = [
                x.device for x in tree_flatten((args, kwargs))[0] if isinstance(x, FakeTensor)
            ]
            fake_out = tree_map(lambda out: self._empty_like(out, devices[0]), real_out)
        finally:
            self._inside = False
        for fake, value in zip(tree_flatten(fake_out)[0], tree_flatten(real_out)[0], strict=True):
            if isinstance(fake, FakeTensor):
                if (fake.shape, fake.dtype) != (value.shape, value.dtype) or (
                    custom and fake.stride() != value.stride()
                ):
                    raise AssertionError(
                        f"{func}: the fake implementation gives {tuple(fake.shape)} "
                        f"{fake.dtype} strides {fake.stride()}, the op {tuple(value.shape)} "
                        f"{value.dtype} strides {value.stride()}"
                    )
                fake.simulated = value
        return fake_out

    def _empty_like(self, value, device: torch.device):
        if not isinstance(value, torch.Tensor):
            return value
        return super().__torch_dispatch__(
            torch.ops.aten.empty_strided.default, (), (value.shape, value.stride()),
            {"dtype": value.dtype, "device": device},
        )  # fmt: skip

    def to_cuda(self, obj):
        """``obj`` on the simulated device: a module in place (parameters and buffers), a
        tensor, or a dict of them (other values unchanged). Call inside the mode."""
        if isinstance(obj, torch.nn.Module):
            for module in obj.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        cuda = param.detach().to(CUDA)
                        module._parameters[name] = torch.nn.Parameter(cuda, requires_grad=False)
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None:
                        module._buffers[name] = buffer.to(CUDA)
            return obj
        if isinstance(obj, dict):
            return {key: self.to_cuda(value) for key, value in obj.items()}
        return obj.to(CUDA) if isinstance(obj, torch.Tensor) else obj
