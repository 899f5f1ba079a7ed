"""Devices a test runs on: the CPU always, CUDA where a GPU is present (skipped, with the
reason, where it is not; CI has none, so nothing depends on one)."""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device here")),
]
