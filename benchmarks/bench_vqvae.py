"""VQ-VAE throughput: training images/s and evaluation (encode + decode) images/s.

    python -m benchmarks.bench_vqvae                       # stage 1's settings: 16x16 gray,
    python -m benchmarks.bench_vqvae --image_size 32 --in_channels 3   # 64 channels, /4, K=128
"""

import argparse

import torch

from benchmarks.common import matmul_peak_flops, timed
from pipeline.device import PRECISIONS, autocast, pick_device, resolve_precision
from vqvae.model import VQVAE, VQVAEConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--in_channels", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--codebook_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="as the trainers' (benchmarks/bench_precision.py compares them)")
    args = parser.parse_args()
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=args.in_channels, image_size=args.image_size,
                         channels=args.channels, downsample=args.downsample,
                         codebook_size=args.codebook_size)
    model = VQVAE(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(args.batch_size, args.in_channels, args.image_size, args.image_size,
                        device=device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, measured fp32 matmul peak "
          f"{matmul_peak_flops(device) / 1e9:.1f} GFLOP/s")
    print(f"config: {config}, precision {precision}")

    def train_step():
        with autocast(device, precision):
            _, loss, _ = model(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = timed(train_step, device, repeat=args.steps, warmup=3)
    print(f"training:   {args.batch_size / seconds:8.0f} images/s  ({seconds * 1e3:.1f} ms/step, "
          f"batch {args.batch_size})")

    model.eval()
    big = torch.rand(256, args.in_channels, args.image_size, args.image_size, device=device)

    @torch.no_grad()
    def evaluate():
        with autocast(device, precision):
            model.decode(model.encode(big))
    seconds = timed(evaluate, device, repeat=max(1, args.steps // 3), warmup=1)
    print(f"evaluation: {256 / seconds:8.0f} images/s  (encode + decode, batch 256)")


if __name__ == "__main__":
    main()
