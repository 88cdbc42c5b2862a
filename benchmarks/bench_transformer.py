"""Prior throughput: sampling (with and without the KV cache) and training, in tokens/s, with
FLOPs per token and the fraction of this machine's measured matmul peak.

    python -m benchmarks.bench_transformer                      # the issue's size: 16x16 grid,
    python -m benchmarks.bench_transformer --batch_sizes 1 64 256   # d=256, 8 heads, 4 layers, 512 codes

FLOPs counted per sampled code (one cached step of one image), 2 per multiply-add, matmuls only:
per layer the fused qkv (3 d^2), the output projection (d^2) and the MLP (8 d^2) weights, plus
the attention scores and weighted sum over the keys cached so far (2 * context * d); then the
head (d * vocab). The step at position t attends over t + 1 keys, so a whole image averages
(T + 1) / 2. Layer norms, GELU, softmaxes, biases and the draw itself are not counted.

The attention reads every cached key and value once per step: n_layer * 2 * context * d fp32
numbers per code (about 1 MB at the default size), so at large batches the cached sampler is
bound by memory bandwidth as much as by the matmul peak; the script prints that figure too.
"""

import argparse

import torch

from benchmarks.common import matmul_peak_flops, timed
from pipeline.device import pick_device
from transformer.gpt import GPT, GPTConfig, sample_without_cache


def flops_per_token(config, context):
    """Forward FLOPs for one token: 2 per weight-multiply in the blocks and head, plus the
    attention scores and weighted sum over `context` keys (per layer: 2 * 2 * context * d)."""
    d, layers = config.n_embd, config.n_layer
    weights = layers * 12 * d * d + d * config.vocab_size
    return 2 * weights + layers * 4 * context * d


def cache_bytes_per_token(config, context):
    """Bytes of cached keys and values one step reads for one image (fp32)."""
    return config.n_layer * 2 * context * config.n_embd * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--uncached_batch", type=int, default=1)
    parser.add_argument("--uncached_codes", type=int, default=64,
                        help="time the uncached sampler over this many codes (it is slow)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); on a machine shared "
                             "with other jobs, 1 avoids threads waiting on each other every op")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, grid_h=args.grid, grid_w=args.grid,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    model = GPT(config).to(device).eval()
    T = config.block_size
    peak = matmul_peak_flops(device)
    context = (T + 1) / 2  # mean number of keys a step attends over (1 at t = 0 .. T)
    sample_flops = flops_per_token(config, context)
    print(f"device {device}, torch threads {torch.get_num_threads()}, measured fp32 matmul "
          f"peak {peak / 1e9:.1f} GFLOP/s")
    print(f"model: {args.n_layer} layers, d={args.n_embd}, {args.n_head} heads, {args.vocab} "
          f"codes, {T} codes per image; {sample_flops / 1e6:.2f} MFLOP and "
          f"{cache_bytes_per_token(config, context) / 1e6:.2f} MB of cached keys and values "
          f"read per sampled code")

    print("\nsampling with KV cache (one forward step per code):")
    cached = {}
    for b in args.batch_sizes:
        seconds = timed(lambda: model.sample(b), device, repeat=1, warmup=1 if b <= 64 else 0)
        rate = b * T / seconds
        cached[b] = rate
        print(f"  batch {b:4d}: {rate:10.0f} codes/s  {rate * sample_flops / peak:6.1%} of peak"
              f"  ({seconds:.2f} s for {b} images)")

    # the reference's way: re-run the whole prefix for each new code, one image at a time
    b, n_codes = args.uncached_batch, min(args.uncached_codes, T)
    small = GPT(GPTConfig(**{**config.__dict__, "grid_h": 1, "grid_w": n_codes})).to(device).eval()
    small.load_state_dict({k: (v[:n_codes] if k == "position_embedding.weight" else v)
                           for k, v in model.state_dict().items()}, strict=False)
    # a prefix of n_codes costs sum_t t ~ n^2/2 token-forwards; scale to a full T-code image
    seconds = timed(lambda: sample_without_cache(small, b), device, repeat=1, warmup=0)
    full_seconds = seconds * (T * (T + 1)) / (n_codes * (n_codes + 1))
    uncached = b * T / full_seconds
    print(f"\nsampling without cache (prefix re-run every step), batch {b}: "
          f"{uncached:.1f} codes/s (timed over {n_codes} codes, scaled to {T})")
    best = max(cached.values())
    print(f"speed-up of the best cached batch over uncached batch {b}: {best / uncached:.0f}x")

    print("\ntraining (forward + backward + AdamW step):")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    train_flops = 3 * flops_per_token(config, context)  # backward ~ 2x forward
    for b in [bs for bs in args.batch_sizes if bs >= 16] or [16]:
        codes = torch.randint(args.vocab, (b, T), device=device)

        def step():
            _, loss = model(codes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = timed(step, device, repeat=3, warmup=1)
        rate = b * T / seconds
        print(f"  batch {b:4d}: {rate:10.0f} tokens/s  {rate * train_flops / peak:6.1%} of peak")


if __name__ == "__main__":
    main()
