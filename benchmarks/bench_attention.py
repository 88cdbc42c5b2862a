"""Sampling one token at a time with each attention kind: recurrent linear attention (and its
momentum variant) against softmax with its KV cache and softmax without a cache (the whole
prefix re-run at every step, as a sampler with no cache must).

    python -m benchmarks.bench_attention          # the issue's grid: lengths 256, 768, 3072
                                                  # (16x16 grey, 16x16 and 32x32 RGB byte
                                                  # streams), d=256, 4 layers, 8 heads,
                                                  # batch 1/16/64 (~10 min on 2 quiet cores)
    python -m benchmarks.bench_attention --lengths 3072 --batches 16

What is timed: one sampler step = the network's step (`model.step`, as priors/sampling.py calls
it) plus drawing the token from the head. A whole 3,072-token sequence at batch 64 takes minutes
per kind on a CPU, so steps are timed in windows: --window steps at --points positions spread
evenly from the first token to the last, from a cache filled with random numbers (a step's cost
does not depend on the values). The windows are visited in turn --rounds times, so that a change
in the machine's load hits the first and the last token alike; a position's figure is the median
of its steps over the rounds (--statistic min: the fastest, closer to the uncontended cost on a
machine that others share). A kind's tokens/s is batch / (mean per-step time over the windows):
the mean of a per-step cost that is flat (linear attention) or grows linearly with the position
(softmax) over the whole sequence. Softmax without a cache is timed with one step per window and
only at --uncached_batches.

% peak counts one token's forward FLOPs per token drawn (for softmax without a cache that is the
useful work, not the prefix it recomputes) against the measured matmul peak.

Memory per sequence is what a kind keeps between steps: the KV cache (2 x layers x T x d floats,
allocated for the whole sequence at the start), or the running sums (layers x heads x (hs^2 +
hs) floats, twice hs^2 with momentum), whatever the position. Softmax without a cache keeps
only the tokens, but re-reads them all at every step.
"""

import argparse
import statistics
import time

import torch

from benchmarks.common import matmul_peak_flops, sync
from pipeline.device import pick_device
from priors.sampling import draw
from transformer.gpt import GPT, GPTConfig

GRIDS = {256: (16, 16), 768: (16, 48), 3072: (32, 96)}  # grey 16x16, RGB 16x16, RGB 32x32


def build(kind, length, args, device):
    torch.manual_seed(0)
    height, width = GRIDS.get(length, (1, length))
    config = GPTConfig(vocab_size=args.vocab, grid_h=height, grid_w=width, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0,
                       attention="softmax" if kind.startswith("softmax") else kind)
    return GPT(config).to(device).eval()


def flops_per_step(config, position):
    """Forward FLOPs of one token at `position`: the weights, plus attention — over `position`
    keys for softmax (scores and weighted sum: 4 d per key per layer), or the state update and
    read for the linear kinds (4 d hs per layer)."""
    d, layers = config.n_embd, config.n_layer
    weights = layers * 12 * d * d + d * config.vocab_size
    if config.attention == "softmax":
        return 2 * weights + layers * 4 * d * position
    return 2 * weights + layers * 4 * d * (d // config.n_head)


def fill_randomly(cache):
    for name in ("k", "v", "S", "P", "k_last", "v_last"):
        if getattr(cache, name, None) is not None:
            getattr(cache, name).normal_()
    if hasattr(cache, "z"):
        cache.z.uniform_(1, 2)  # a positive normaliser, as phi(k) sums are


@torch.no_grad()
def cached_windows(model, batch, positions, window, rounds, device, statistic=statistics.median):
    """Per-step seconds at each window start (`statistic` of its steps over the rounds),
    sampler steps on the kind's own cache; and the cache's bytes per sequence."""
    tokens = torch.randint(model.config.vocab_size, (batch, model.positions, 1), device=device)
    state = model.begin(batch, None)
    fill_randomly(state["cache"])
    steps = {start: [] for start in positions}
    for _ in range(rounds):
        for start in positions:
            for p in range(start, min(start + window, model.positions)):
                begin = time.perf_counter()
                out = model.step(state, p, tokens)
                tokens[:, p, 0] = draw(out.float().log_softmax(-1))
                sync(device)
                steps[start].append(time.perf_counter() - begin)
    times = [statistic(steps[start]) for start in positions]
    cache = state["cache"]
    nbytes = sum(getattr(cache, n).nbytes for n in ("k", "v", "S", "z", "P", "k_last", "v_last")
                 if getattr(cache, n, None) is not None)
    return times, nbytes / batch


@torch.no_grad()
def uncached_windows(model, batch, positions, device):
    """Seconds of one uncached step at each position: a forward over the whole prefix."""
    tokens = torch.randint(model.config.vocab_size, (batch, model.positions), device=device)
    times = []
    for p in positions:
        begin = time.perf_counter()
        out, _ = model(tokens[:, :p + 1])
        tokens[:, p] = draw(out[:, p].float().log_softmax(-1))
        sync(device)
        times.append(time.perf_counter() - begin)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 768, 3072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--uncached_batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--kinds", nargs="+", default=["linear", "momentum", "softmax"])
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256, help="byte values")
    parser.add_argument("--points", type=int, default=3, help="windows per sequence")
    parser.add_argument("--window", type=int, default=8, help="steps timed per window and round")
    parser.add_argument("--rounds", type=int, default=3, help="visits of every window")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="of the steps in a window")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device")
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    statistic = {"median": statistics.median, "min": min}[args.statistic]
    peak = matmul_peak_flops(device)
    print(f"device {device}, {torch.get_num_threads()} threads, measured fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; d={args.n_embd}, {args.n_layer} layers, {args.n_head} "
          f"heads, {args.vocab} values; {args.points} windows of {args.window} steps x "
          f"{args.rounds} rounds per sequence, {args.statistic} step of each (softmax without "
          f"cache: 1 step per window)")
    header = (f"{'T':>5} {'batch':>5} {'kind':<16} {'tokens/s':>10} {'% peak':>7} "
              f"{'first ms':>9} {'last ms':>9} {'last/first':>10} {'memory/seq':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    rates = {}
    for length in args.lengths:
        positions = [round(i * (length - args.window) / max(1, args.points - 1))
                     for i in range(args.points)]
        for batch in args.batches:
            rows = [(kind, "cached") for kind in args.kinds]
            if batch in args.uncached_batches:
                rows.append(("softmax", "uncached"))
            for kind, mode in rows:
                model = build(kind, length, args, device)
                if mode == "cached":
                    times, memory = cached_windows(model, batch, positions, args.window,
                                                   args.rounds, device, statistic)
                    label = {"softmax": "softmax+KV"}.get(kind, f"{kind} (recur.)")
                    starts = positions
                else:
                    starts = [p + args.window - 1 for p in positions]  # the same last token
                    times, memory = uncached_windows(model, batch, starts, device), 8 * length
                    label = "softmax no cache"
                mean = statistics.fmean(times)
                rate = batch / mean
                flops = statistics.fmean(flops_per_step(model.config, p) for p in starts)
                rates[(length, batch, label)] = (rate, times[-1] / times[0])
                print(f"{length:>5} {batch:>5} {label:<16} {rate:>10.0f} "
                      f"{rate * flops / peak:>7.1%} {1e3 * times[0]:>9.2f} {1e3 * times[-1]:>9.2f} "
                      f"{times[-1] / times[0]:>10.2f} {format_bytes(memory):>11}")
                del model
        print()
    summary(rates)


def format_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary(rates):
    print("comparisons (ratios of tokens/s within this run):")
    for (length, batch, label), (rate, flatness) in sorted(rates.items()):
        if label != "linear (recur.)":
            continue
        line = f"  T={length} batch {batch}: linear recurrent per-step last/first {flatness:.2f}"
        line += " (flat within 20%)" if abs(flatness - 1) <= 0.2 else " (NOT flat within 20%)"
        for other in ("softmax+KV", "softmax no cache"):
            if (length, batch, other) in rates:
                line += f"; {rate / rates[(length, batch, other)][0]:.1f}x {other}"
        print(line)
    uncached = [key for key in rates if key[2] == "softmax no cache"]
    if uncached:
        length = max(k[0] for k in uncached)
        best_linear = max(rates[k][0] for k in rates if k[0] == length and k[2] == "linear (recur.)")
        best_uncached = max(rates[k][0] for k in uncached if k[0] == length)
        print(f"  T={length}, each at its largest batch timed: linear recurrent "
              f"{best_linear / best_uncached:.0f}x softmax without a cache (the reference's "
              f"'up to 4000x' is this comparison, on a GPU)")


if __name__ == "__main__":
    main()
