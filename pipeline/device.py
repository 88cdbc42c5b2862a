"""Device choice: CUDA when there is one, CPU otherwise, and what mixed precision it allows."""

import contextlib

import torch

from core.errors import UserError


def pick_device(requested=None):
    """Return a torch.device: `requested` if usable, else cuda when available, else cpu."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}' (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was requested but CUDA is not available here")
    return device


def autocast(device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device):
    """fp16 autocast needs loss scaling; bf16 and fp32 do not."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()
