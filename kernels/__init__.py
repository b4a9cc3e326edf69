"""Fused Triton kernels of advent_fast (installed as ``advent_fast.kernels``).

The two ops of docs/backend_contract.md (signatures and outputs there):
  target_forward(x, prior, k, mu, want_info, want_emap, want_ent, want_cp)
      -> (info, emap, ent, cp, thresh, kept, cmean, keep)
  target_backward(x, grad_info, grad_emap, grad_ent, grad_cp, keep, kept, cmean, prior, mu) -> grad_x
The upsampling-fused versions are in upsampled_cross_entropy.py and upsampled_target.py. The launchers
run on the current CUDA device: callers make the tensors' device current (advent_fast.backend.device_guard).
"""
from .target_backward import target_backward
from .target_forward import target_forward

__all__ = ["target_backward", "target_forward"]
