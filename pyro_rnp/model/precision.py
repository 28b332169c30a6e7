"""Full precision where mixed precision would hurt: the one rule every such place follows."""
from __future__ import annotations

import torch


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is in a half-precision type (from autocast), else x itself (float32 and
    float64 stay as they are)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
