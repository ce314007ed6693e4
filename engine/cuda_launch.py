"""Kernel launches that let the next kernel start early: programmatic dependent launch (PDL, Hopper and newer).

A decode step is a chain of ~340 kernels, most of them a few microseconds long, and between two of them the GPU
drains one grid and launches, schedules and sets up the next. With PDL a kernel may launch while the one before
it still runs: its blocks become resident and set up while that kernel finishes, then wait
(`griddepcontrol.wait`) before they read anything it wrote (measured on an H200, 7B 4-bit decode: 482.7 ->
528.1 tok/s). The matmuls read their first weights before that wait, since no kernel writes them (532.3 ->
591.7; asking for the weights into L2 instead lost: bench/NOTES-engine.md). Every kernel launched this way
must wait before its first dependent read and before any write, which keeps the stream's order for every
kernel after it too (each one completes only after its own wait). The kernel before lets it launch early with
`griddepcontrol.launch_dependents`; without that it launches as the earlier kernel's blocks exit.

CUDA graphs keep these launches as programmatic edges, so the captured decode step overlaps them too.
HEARTH_PDL=0 in the environment launches every kernel plainly (to measure one against the other).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CUlaunchAttributeID


class _Attribute(ctypes.Structure):   # CUlaunchAttribute: an id, then a 64-byte value union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):      # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


@functools.cache
def enabled(device_index: int) -> bool:
    """Whether kernels on this CUDA device launch with PDL: compute capability 9.0+, not turned off."""
    return (os.environ.get("HEARTH_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


@functools.cache
def triton_enabled(device_index: int) -> bool:
    """Whether Triton kernels on this device launch with PDL: as `enabled`, where this Triton has the launch
    option and the grid-dependency instructions (3.4+). Such kernels take a PDL flag and begin with
    `if PDL: tl.extra.cuda.gdc_launch_dependents(); tl.extra.cuda.gdc_wait()`: short kernels let the next
    one launch at once, and wait before touching memory."""
    if not enabled(device_index):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def triton_pdl(x: torch.Tensor) -> dict:
    """The PDL flag and launch option of a Triton kernel working on x (see `triton_enabled`)."""
    on = x.is_cuda and triton_enabled(x.get_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.cache
def _driver():
    """The CUDA driver library, loaded once: torch's own kernel call loads it again at every launch, which an
    eager prompt's few hundred dequantize launches felt (bench/NOTES-engine.md)."""
    from torch.cuda._utils import _get_gpu_runtime_library

    return _get_gpu_runtime_library()


def _current_stream(device_index: int) -> int:
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # CUDA builds of torch have it
    return raw(device_index) if raw is not None else torch.cuda.current_stream(device_index).cuda_stream


def launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, pdl: bool = True) -> None:
    """Launch a kernel from torch's NVRTC loader (`torch.cuda._utils._cuda_load_module`) on the current stream,
    with PDL where `enabled` and `pdl` (a kernel that does not wait for the one before, as `wait_for_prerequisites`
    does, must pass pdl=False). args: CUDA tensors (passed as pointers) and ints (as C ints), in the kernel's
    parameter order."""
    device = torch.cuda.current_device()
    held, pointers = [], (ctypes.c_void_p * len(args))()
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            value = ctypes.c_void_p(arg.data_ptr())
        elif isinstance(arg, int):
            value = ctypes.c_int(arg)
        else:
            raise TypeError(f"kernel argument {i}: {type(arg).__name__} (tensors and ints only)")
        held.append(value)
        pointers[i] = ctypes.cast(ctypes.byref(value), ctypes.c_void_p)
    stream = _current_stream(device)
    if pdl and enabled(device):
        attribute = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attribute.value[0] = 1
        config = _Config(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), shared=0,
                         stream=stream, attrs=ctypes.pointer(attribute), num_attrs=1)
        status = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
        what = "cuLaunchKernelEx"
    else:
        status = _driver().cuLaunchKernel(kernel.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                                          ctypes.c_void_p(stream), pointers, None)
        what = "cuLaunchKernel"
    if status != 0:
        raise RuntimeError(f"{what} failed ({status})")
