"""Model FLOPs of packed micro-batches, for model FLOPs utilisation (MFU).

Model FLOPs are what the model must compute for the real segments: no padding, no recomputation for gradient
checkpointing, no LM head (a reward model has none). Per token, every linear weight costs 2 FLOPs forward and 2
backward for the activation gradient, and 2 more where the weight trains (6N for full fine-tuning, about 4N with
LoRA). Attention costs 2 FLOPs per multiply-add for QK^T and again for AV per query-key pair and hidden unit,
forward; backward twice that: 12 * hidden * layers per causal query-key pair.
"""

from __future__ import annotations

import torch

# dense bf16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name(); the first match wins
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
)


def peak_tflops(configured: float, device: torch.device, bf16: bool) -> float | None:
    """`train.peak_tflops`, else the device's dense bf16 peak when training in bf16 on a known GPU, else None."""
    if configured:
        return configured
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def causal_pairs(cu_seqlens: torch.Tensor, seg_parent: torch.Tensor) -> int:
    """Query-key pairs attention computes: each segment causally over itself, plus the whole shared prefix it
    continues (prompt sharing)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    prefix = torch.where(seg_parent >= 0, lengths[seg_parent.clamp(min=0)], torch.zeros_like(lengths))
    return int((lengths * (lengths + 1) // 2 + lengths * prefix).sum())


def model_flops(tokens: int, pairs: int, matmul: tuple[int, int], hidden: int, layers: int) -> float:
    """FLOPs of one forward + backward over `tokens` tokens with `pairs` causal query-key pairs; `matmul` is
    (linear weights, trainable linear weights)."""
    weights, trained = matmul
    return float((4 * weights + 2 * trained) * tokens + 12 * hidden * layers * pairs)
