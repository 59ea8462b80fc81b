"""Import first in a Triton test module: on a machine without CUDA, Triton kernels can only
run in its interpreter, which Triton reads from TRITON_INTERPRET when it is first imported.
So this sets it before triton is imported (and skips the module if triton already was)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET before this module; "
                    "run this file on its own", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the Triton kernels need triton")
