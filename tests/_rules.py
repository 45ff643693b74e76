"""Shared accuracy rules for kernel tests.

Tolerance rule: a backend's error at a precision must be at most ``FACTOR`` times the error
of PyTorch's own dense attention at that precision, both measured against a float64 oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTOR = 2.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude."""
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def attention_outputs_and_grads(fn, q, k, v, do, extra=()):
    """Run ``fn(q, k, v, *extra)`` and backprop ``do``; returns [out, dq, dk, dv, d(extra)...]."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *extra)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return [out.detach(), *grads]


def round_to(dtype, *tensors):
    """Inputs representable at ``dtype``, as float64: every oracle sees the same values as
    the low-precision run, so the measured error is the computation's, not the inputs'."""
    return [t.to(dtype).double() for t in tensors]


def dense_errors(q, k, v, do, dtype) -> list[float]:
    """Errors of ``scaled_dot_product_attention`` at ``dtype`` against float64 (out, dq, dk, dv),
    on inputs first rounded to ``dtype``."""
    q, k, v, do = round_to(dtype, q, k, v, do)
    ref = attention_outputs_and_grads(
        F.scaled_dot_product_attention, q.double(), k.double(), v.double(), do.double()
    )
    low = attention_outputs_and_grads(
        F.scaled_dot_product_attention, q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype)
    )
    return [rel_err(a, b) for a, b in zip(low, ref)]
