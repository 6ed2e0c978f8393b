"""The argument checks every Triton launcher makes before it hands pointers to a kernel.

A kernel trusts its pointers: a wrong dtype, shape or device would read or write out of bounds
(or another device's memory). These checks read only metadata and fail with one line naming the
kernel, the argument, what it must be and what came. Index values are not range-checked: that
is a pass over them and a device sync per call; callers pass indices from a top-k over n.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # accumulated in float32 whatever came
INDICES = (torch.int64, torch.int32)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(t).removeprefix("torch.") for t in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')} tensor of shape {list(t.shape)} on {t.device}"


def checked(
    kernel: str,
    name: str,
    t: object,
    dtypes: tuple[torch.dtype, ...],
    shape: str,
    sizes: tuple[int | None, ...],
    device: torch.device,
) -> torch.Tensor:
    """t as a contiguous tensor, or a ValueError: "gather_sum: W must be a float32, bfloat16 or
    float16 tensor of shape [n, d] = [*, 40] on cuda:0; got float64 tensor of shape [96, 40] on
    cuda:0". sizes: the fixed sizes (None where the argument defines its own)."""
    ok = (
        isinstance(t, torch.Tensor)
        and t.dtype in dtypes
        and t.dim() == len(sizes)
        and all(s is None or s == a for s, a in zip(sizes, t.shape, strict=True))
        and t.device == device
    )
    if not ok:
        fixed = ""
        if any(s is not None for s in sizes):
            fixed = " = [" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"
        raise ValueError(
            f"{kernel}: {name} must be a {_names(dtypes)} tensor of shape {shape}{fixed} on "
            f"{device}; got {_describe(t)}"
        )
    return t.contiguous()
