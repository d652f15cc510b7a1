"""The dtypes a user can ask for (`model.dtype` in training, `--dtype` for score, eval, export and the benchmarks).

Names only at import, so that the config schema can list the choices without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

Name = Literal["auto", "bf16", "fp32"]  # auto: see `training` and `saved`
CHOICES = get_args(Name)
TORCH_NAMES = {"bf16": "bfloat16", "fp32": "float32"}  # what users write → torch's dtype


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, TORCH_NAMES[name])


def training(name: str, cuda: bool) -> torch.dtype:
    """The dtype weights are trained in: `auto` is bf16 on CUDA and fp32 on CPU."""
    return _dtype(("bf16" if cuda else "fp32") if name == "auto" else name)


def saved(name: str) -> torch.dtype | None:
    """The dtype a trained model is loaded in: `auto` (None) keeps the one it was saved in."""
    return None if name == "auto" else _dtype(name)


def name_of(dtype: torch.dtype) -> str:
    return next(name for name in TORCH_NAMES if _dtype(name) == dtype)
