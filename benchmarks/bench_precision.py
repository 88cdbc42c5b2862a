"""fp32 against bf16 autocast (--precision), in one run, at the demo's sizes: training steps/s
of both stages, sampling codes/s of each family, each figure as a share of this machine's
measured roofs.

    python -m benchmarks.bench_precision                  # the CPU
    python -m benchmarks.bench_precision --device cuda    # a GPU (benchmarks/gpu_check.sh)
    python -m benchmarks.bench_precision --rounds 5 --threads 1

The models are the `small` preset's (pipeline/run.py PRESETS), the demo's: a VQ-VAE of 64
channels, f4, K 64 on 64 16x16 grey images per step; a conditional GPT of 4 layers of 128 (4
heads, dropout 0.3) on 64 4x4 grids of its codes per step. Sampling: that GPT with its KV cache
at batch 1, 64 and 256 (labels, no guidance: the demo's guidance 1.3 doubles the batch), with
the cache fp32 (the default) and bf16 (--cache_dtype bf16); an absorbing prior of the same size
on the same grids (16 steps, batch 256); PixelCNN++ at its defaults (32 filters, 2 scales) on
the same grids (batch 256; on the `pixels` tokenizer's 16x16 grid of grey levels a draw takes
minutes, not seconds). Then one grid of 256 codes (16x16) at batch 1, autoregressive (KV
cache) against absorbing (256 and 32 steps): the latency of one image.

Every figure is timed in rounds, fp32 and bf16 alternating inside each round so that the
machine's load (the CPU is shared) falls on both alike; the table gives the fastest round,
the one least slowed by other work.

Roofs, measured here at the start, the best of several tries: the matmul peak of each dtype
(benchmarks/common.py, a 2048^2 matmul on a CPU) and the stream bandwidth (a copy of a 256 MB
tensor: bytes read + written per second). FLOPs are counted by torch.utils.flop_counter on one
untimed call of each timed function (2 per multiply-add; every matmul, linear layer and
convolution, the attention kernel counted as its full score matrix even where causal; a
training step's backward included), so "% peak" is the share of its dtype's matmul peak that
the step's matrix arithmetic would fill. Bytes, for KV-cache sampling only: per step, the
weights of every linear layer (fp32 4 bytes; under bf16 autocast 2, cast once per draw) and the
cached keys and values the step reads (L x B x 2 x (t + 1) x d, t averaged over the grid), at
4 bytes for an fp32 cache (read as stored, also under bf16: transformer/block.py) and 2 for
bf16. "% BW" is bytes per second over the measured bandwidth: near 100% the
step is memory-bound, far below both roofs it is bound by per-op overhead.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import priors
from benchmarks.common import matmul_peak_flops, sync
from pipeline.device import autocast, has_bf16_units, pick_device
from pipeline.run import PRESETS
from vqvae.model import VQVAE, VQVAEConfig

SMALL = PRESETS["small"]
NUM_CLASSES = 10  # the demo's digits


# roofs and FLOP counts

def _register_cpu_attention_flops():
    """torch's flop counter knows the GPU attention kernels, not the CPU one: count it like
    them (2 FLOPs per multiply-add of the scores and of the weighted sum, backward twice that)."""
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        b, h, s_q, d_q = query_shape
        s_k, d_v = key_shape[-2], value_shape[-1]
        return 2 * b * h * s_q * s_k * (d_q + d_v)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                 **kwargs):
        return 2 * forward(query_shape, key_shape, value_shape)
    try:
        register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)(forward)
        register_flop_formula(
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(backward)
    except (AttributeError, RuntimeError):  # another torch: its own formulas or none
        pass


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stream_bandwidth(device, megabytes=256, repeat=5):
    """Bytes/s of a large copy (read + written), the best of `repeat`."""
    source = torch.empty(megabytes * 2 ** 20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


# the models and what is timed

def vqvae_step(device):
    """One training step of the demo's VQ-VAE, as pipeline/train_tokenizer.py takes it."""
    torch.manual_seed(0)
    s = SMALL["vqvae"]
    config = VQVAEConfig(in_channels=1, image_size=s["image_size"], channels=s["channels"],
                         downsample=s["downsample"], codebook_size=s["codebook_size"])
    model = VQVAE(config).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], fused=True)
    images = torch.rand(s["batch_size"], 1, s["image_size"], s["image_size"], device=device)
    images = images.contiguous(memory_format=torch.channels_last)

    def step(precision):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            _, loss, _ = model(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def gpt_config(grid=4, vocab=None):
    p = SMALL["prior"]
    return {"vocab_size": vocab or SMALL["vqvae"]["codebook_size"], "grid_h": grid,
            "grid_w": grid, "num_classes": NUM_CLASSES, "n_layer": p["n_layer"],
            "n_head": p["n_head"], "n_embd": p["n_embd"], "dropout": p["dropout"]}


def prior_step(device):
    """One training step of the demo's prior, as pipeline/train_prior.py takes it."""
    torch.manual_seed(0)
    p = SMALL["prior"]
    model = priors.build("gpt", gpt_config()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], betas=(0.9, 0.95),
                                  fused=True)
    tokens = torch.randint(SMALL["vqvae"]["codebook_size"], (p["batch_size"], 4, 4),
                           device=device)
    labels = torch.randint(NUM_CLASSES, (p["batch_size"],), device=device)

    def step(precision):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            _, loss = model(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def sampler(model, batch, device, cache_dtype=None, **settings):
    """Draw `batch` grids (labels when the prior is conditional) in the given precision."""
    labels = (torch.arange(batch, device=device) % NUM_CLASSES
              if model.config.num_classes else None)
    extra = {"cache_dtype": cache_dtype} if cache_dtype else {}

    def draw(precision):
        generator = torch.Generator(device=device).manual_seed(0)
        with autocast(device, precision):
            model.sample(batch, labels, generator=generator, **extra, **settings)
    return draw


def kv_bytes_per_step(model, batch, precision, cache_dtype):
    """Bytes one cached sampling step moves (module docstring): weights and cached keys and
    values read, the step's position averaged over the grid."""
    config = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes = weights * (2 if precision == "bf16" else 4)
    context = (config.block_size + 1) / 2
    elements = config.n_layer * batch * 2 * context * config.n_embd
    return weight_bytes + elements * (2 if cache_dtype == "bf16" else 4)


# timing

def best_rates(items, rounds, device):
    """{(item, variant): work units per second in the fastest of `rounds` rounds}; variants
    alternate inside each round."""
    times = {key: [] for key in items}
    for round_ in range(rounds + 1):  # round 0 warms up
        for key, (fn, units) in items.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                times[key].append(time.perf_counter() - start)
    return {key: items[key][1] / min(spent) for key, spent in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip_latency", action="store_true",
                        help="leave out the 256-code latencies (the slowest part)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    _register_cpu_attention_flops()
    # the best of several short measurements, as the figures are the fastest of their rounds
    peaks = {name: max(matmul_peak_flops(device, dtype=dtype, seconds=0.25) for _ in range(6))
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    bandwidth = stream_bandwidth(device)
    name = torch.cuda.get_device_name(device) + ", " if device.type == "cuda" else ""
    units = "bf16 units" if has_bf16_units(device) else "no bf16 units"
    print(f"device {device} ({name}{units}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; measured: fp32 matmul "
          f"{peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 matmul {peaks['bf16'] / 1e9:,.0f} GFLOP/s, "
          f"stream copy {bandwidth / 1e9:,.1f} GB/s")

    # rows: (label, unit, {variant: (fn, work units per call, flops per call, bytes per call)})
    rows = []
    for label, make in (("VQ-VAE training (batch 64)", vqvae_step),
                        ("prior training (GPT, batch 64)", prior_step)):
        step = make(device)
        flops = count_flops(lambda: step("fp32"))

        def repeat(precision, step=step):
            for _ in range(args.steps):
                step(precision)
        rows.append((label, "steps/s", {
            v: (lambda v=v, repeat=repeat: repeat(v), args.steps, flops * args.steps, None)
            for v in ("fp32", "bf16")}))

    gpt = priors.build("gpt", gpt_config()).to(device).eval()
    codes = gpt.config.block_size
    for batch in (1, 64, 256):
        variants = {}
        for variant, precision, cache_dtype in (("fp32", "fp32", None), ("bf16", "bf16", None),
                                                ("bf16 + bf16 cache", "bf16", "bf16")):
            draw = sampler(gpt, batch, device, cache_dtype)
            flops = count_flops(lambda: draw("fp32"))
            moved = kv_bytes_per_step(gpt, batch, precision, cache_dtype) * codes
            variants[variant] = (lambda draw=draw, p=precision: draw(p), batch * codes, flops,
                                 moved)
        rows.append((f"GPT sampling, KV cache, batch {batch}", "codes/s", variants))

    absorbing = priors.build("absorbing", gpt_config()).to(device).eval()
    draw = sampler(absorbing, 256, device, steps=codes)
    rows.append((f"absorbing sampling ({codes} steps, batch 256)", "codes/s", {
        v: (lambda v=v, draw=draw: draw(v), 256 * codes, count_flops(lambda: draw("fp32")), None)
        for v in ("fp32", "bf16")}))

    pixelcnn = priors.build("pixelcnnpp", {**gpt_config(), "dropout": 0.0}).to(device).eval()
    draw = sampler(pixelcnn, 256, device)
    rows.append(("PixelCNN++ sampling (batch 256)", "codes/s", {
        v: (lambda v=v, draw=draw: draw(v), 256 * codes, count_flops(lambda: draw("fp32")), None)
        for v in ("fp32", "bf16")}))

    if not args.skip_latency:
        big = gpt_config(grid=16)
        gpt_big = priors.build("gpt", big).to(device).eval()
        absorbing_big = priors.build("absorbing", big).to(device).eval()
        for label, model, settings in (("GPT, KV cache", gpt_big, {}),
                                       ("absorbing, 256 steps", absorbing_big, {"steps": 256}),
                                       ("absorbing, 32 steps", absorbing_big, {"steps": 32})):
            draw = sampler(model, 1, device, **settings)
            rows.append((f"one 16x16 grid (256 codes): {label}", "grids/s", {
                v: (lambda v=v, draw=draw: draw(v), 1, count_flops(lambda: draw("fp32")), None)
                for v in ("fp32", "bf16")}))

    items = {(label, v): (fn, units) for label, _, variants in rows
             for v, (fn, units, _, _) in variants.items()}
    rates = best_rates(items, args.rounds, device)

    print(f"\nfastest of {args.rounds} rounds; % peak: matmul FLOP/s over the dtype's measured "
          f"peak; % BW: bytes/s over the measured copy bandwidth (KV-cache sampling)\n")
    print(f"| {'what':<48} | {'unit':<7} | {'fp32':>9} | {'bf16':>9} | {'bf16/fp32':>9} | "
          f"{'fp32 % peak':>11} | {'bf16 % peak':>11} | {'fp32 % BW':>9} | {'bf16 % BW':>9} |")
    print("|" + "|".join("-" * (w + 2) for w in (48, 7, 9, 9, 9, 11, 11, 9, 9)) + "|")
    for label, unit, variants in rows:
        fp32_rate = rates[label, "fp32"]
        _, units, fp32_flops, fp32_moved = variants["fp32"]
        for variant, (_, _, flops, moved) in variants.items():
            if variant == "fp32":
                continue  # every row shows fp32 beside a bf16 variant
            rate = rates[label, variant]
            shares = (fp32_flops * fp32_rate / units / peaks["fp32"],
                      flops * rate / units / peaks["bf16"])
            bw = (f"{fp32_moved * fp32_rate / units / bandwidth:>9.1%} | "
                  f"{moved * rate / units / bandwidth:>9.1%}" if moved else f"{'':>9} | {'':>9}")
            shown = label if variant == "bf16" else f"  same, {variant}"
            print(f"| {shown:<48} | {unit:<7} | {fp32_rate:>9,.1f} | {rate:>9,.1f} | "
                  f"{rate / fp32_rate:>8.2f}x | {shares[0]:>11.1%} | {shares[1]:>11.1%} | "
                  f"{bw} |")


if __name__ == "__main__":
    main()
