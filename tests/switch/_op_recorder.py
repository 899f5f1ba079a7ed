"""Which aten operators a computation runs, with their input dtypes and output shapes: the
tests that check no full-size low-precision copy of the expert weights is made read it."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def record_ops(fn):
    """Run fn under a dispatch mode; (op name, input dtypes, output shape, dtype) per call."""
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if isinstance(out, torch.Tensor):
                calls.append((func.overloadpacket.__name__, [t.dtype for t in tensors],
                              tuple(out.shape), out.dtype))
            return out

    with Record():
        result = fn()
    return result, calls
