"""Device choice: CUDA when there is one, CPU otherwise; and the arithmetic it runs in.

`--precision auto | fp32 | bf16` (every trainer, generation, completion, evaluation, quantizing
and the one command) resolves, per device, to what the run records as its param `precision`:

    auto   bf16 autocast where the device multiplies bf16 matrices in hardware: a CUDA GPU with
           bf16 support, or a CPU reporting AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`),
           whose bf16 matmul runs several times its fp32 one (2-core Xeon with AMX: about
           2,000 against 340 GFLOP/s). fp32 elsewhere: an AVX2-only CPU (an AMD EPYC of the
           earlier machines, say) converts bf16 in software and is slower than fp32. A CUDA GPU
           without bf16 (before Ampere) keeps fp16 autocast with loss scaling ("fp16").
    fp32   no autocast, anywhere.
    bf16   bf16 autocast even without the units: allowed, with one warning line that it will be
           slow, rather than refused, so that bf16's numerics can be checked (and are tested) on
           any machine.

bf16 is autocast, never `.to(bfloat16)`: weights, gradients, optimizer state and weight
averages stay fp32 (the master weights), and autocast runs matmuls and convolutions in bf16
while keeping reductions that need the range in fp32. What each model keeps in fp32 on top of
that is said where it is done: losses and log-probabilities on fp32 logits (priors/heads.py),
codebook distances (vqvae/quantizer.py), linear attention's running sums
(transformer/attention.py), the GPT's KV cache unless `--cache_dtype bf16` (transformer/gpt.py).
"""

import contextlib
import sys

import torch

from core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = ("auto (bf16 autocast where the device has bf16 matrix units, else fp32), fp32 "
                  "or bf16; weights stay fp32")
# CPU flags (Linux /proc/cpuinfo names) of bf16 matrix arithmetic in hardware
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned = set()


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


def read_cpu_flags(path="/proc/cpuinfo"):
    """The feature flags of the first CPU listed in a cpuinfo file (a set of names; empty where
    there is no such file, as on macOS or Windows)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags():
    """This machine's CPU flags. torch's own get_cpu_capability() says "AVX512" on an AMX Xeon
    and on an AVX512 CPU without bf16 alike, so it cannot tell them apart."""
    return read_cpu_flags()


def has_bf16_units(device):
    """Whether `device` multiplies bf16 matrices in hardware (tests monkeypatch this, or the
    two probes it calls)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(requested, device):
    """'auto' | 'fp32' | 'bf16' (None: 'auto') on `device` -> 'fp32', 'bf16', or 'fp16' (auto
    on a CUDA GPU without bf16): what a run records as its param `precision`."""
    requested = requested or "auto"
    if requested not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                        f"'{requested}'")
    device = torch.device(device)
    if requested == "fp32":
        return "fp32"
    units = has_bf16_units(device)
    if requested == "auto":
        if units:
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if not units and (requested, device.type) not in _warned:
        _warned.add((requested, device.type))
        print(f"warning: --precision bf16 on {device.type}, which has no bf16 matrix units: "
              f"it will run, slower than fp32", file=sys.stderr)
    return "bf16"


def autocast(device, precision="fp32"):
    """The context that runs a forward in `precision` (resolve_precision's) on `device`: bf16
    or fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"unresolved precision '{precision}' (resolve_precision first)")
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def needs_grad_scaler(device, precision="fp32"):
    """fp16 autocast needs loss scaling; bf16 (fp32's exponent range) and fp32 do not."""
    return torch.device(device).type == "cuda" and precision == "fp16"
