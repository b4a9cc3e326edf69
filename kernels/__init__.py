"""Fused Triton kernels of advent_fast (installed as ``advent_fast.kernels``).

The two ops of docs/backend_contract.md:
  target_forward(x, prior, k, mu, want_info, want_emap, want_ent, want_cp)
      -> (info, emap, ent, cp, thresh, kept, cmean)
  target_backward(x, grad_info, grad_emap, grad_ent, grad_cp, emap, thresh, kept, cmean, prior, mu)
      -> grad_x
"""
from .target_backward import target_backward
from .target_forward import target_forward

__all__ = ["target_backward", "target_forward"]
