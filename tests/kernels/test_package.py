from __future__ import annotations

import torch

import kernels
from kernels._common import interpreting


def test_exports_and_flag():
    for name in kernels.__all__:
        assert hasattr(kernels, name), name
    # Every kernel launcher has a torch reference named like it, "_ref" for the in-place "_".
    for name in (
        "rms_norm",
        "layer_norm",
        "apply_rotary_",
        "act_mul",
        "act_mul_fused",
        "activation",
        "qmatmul",
        "decode_attention",
    ):
        assert name.rstrip("_") + "_ref" in kernels.__all__
    assert kernels.HAS_TRITON_GPU == (torch.cuda.is_available() and not interpreting())
