"""The demo's two training steps, as the trainers take them now and as they took them before
(torch's bernoulli dropout and for-loop AdamW; contiguous VQ-VAE activations), interleaved in
one process so that the machine's load falls on both alike.

    python -m benchmarks.bench_training_step [--rounds 12] [--steps 15]

Prints ms per step and the ratio now / before for the `small` preset's prior (4 layers of 128,
dropout 0.3, 64 sequences of 4x4 codes, 10 classes) and VQ-VAE (64 channels, f4, K 64, 64
images of 16x16), with the step's share of the machine's measured fp32 matmul peak.
"""

import argparse
import time

import torch
import torch.nn as nn

from benchmarks.common import matmul_peak_flops
from priors.dropout import Dropout
from transformer.gpt import GPT, GPTConfig
from vqvae.model import VQVAE, VQVAEConfig


def prior_step(now):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, grid_h=4, grid_w=4, num_classes=10, n_layer=4, n_head=4,
                       n_embd=128, dropout=0.3)
    model = GPT(config).train()
    if not now:  # back to torch's own dropout
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, Dropout):
                    setattr(module, name, nn.Dropout(child.p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=now)
    tokens, labels = torch.randint(64, (64, 4, 4)), torch.randint(10, (64,))
    # matmul FLOPs: 6 per weight per token (forward and backward), attention left out
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2
                   and "embedding" not in n)
    flops = 6 * matrices * tokens.numel()

    def step():
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step, flops


def vqvae_step(now):
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=1, image_size=16, channels=64, downsample=4,
                         codebook_size=64)
    layout = torch.channels_last if now else torch.contiguous_format
    model = VQVAE(config).to(memory_format=layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=now)
    images = torch.rand(64, 1, 16, 16).contiguous(memory_format=layout)

    def step():
        optimizer.zero_grad(set_to_none=True)
        _, loss, _ = model(images)
        loss.backward()
        optimizer.step()
    return step, None


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="alternations (the first warms up)")
    parser.add_argument("--steps", type=int, default=15, help="steps per variant per round")
    args = parser.parse_args()
    peak = matmul_peak_flops(torch.device("cpu"))
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    for name, make in (("prior", prior_step), ("vqvae", vqvae_step)):
        steps = {"before": make(False), "now": make(True)}
        spent = {variant: 0.0 for variant in steps}
        for round_ in range(args.rounds):
            for variant, (step, _) in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if round_:
                    spent[variant] += time.perf_counter() - start
        per_step = {v: s / ((args.rounds - 1) * args.steps) for v, s in spent.items()}
        flops = steps["now"][1]
        share = f", {flops / per_step['now'] / peak:.0%} of peak (matmuls)" if flops else ""
        ratio = per_step["now"] / per_step["before"]
        print(f"{name}: before {per_step['before'] * 1e3:.1f} ms/step, now "
              f"{per_step['now'] * 1e3:.1f} ms/step, ratio {ratio:.3f}{share}")


if __name__ == "__main__":
    main()
