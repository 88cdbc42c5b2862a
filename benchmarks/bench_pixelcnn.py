"""The convolutional priors against the GPT on the demo digits as 16x16 grey pixels at 16 levels.

    python -m benchmarks.bench_pixelcnn              # defaults: each family's TRAIN_DEFAULTS
    python -m benchmarks.bench_pixelcnn --quick      # a fifth of the steps, fewer samples
    python -m benchmarks.bench_pixelcnn --families pixelcnn pixelsnail --threads 1
    python -m benchmarks.bench_pixelcnn --max_steps 5 --num_samples 4   # a smoke run

Each of pixelcnn, gated_pixelcnn, pixelcnnpp and pixelsnail trains with its own defaults
(`train.py --prior NAME --run_id <levels run>`); then the GPT trains on the same tokens for
about the same wall time as the slowest of them (its step count set from a timed step). For
each: validation bits/dim (`val/bits_per_dim`, the training loop's figure), bits/dim on the
297 held-out digits, a check that the figure ranks held-out digits < degraded digits (a fifth
of the pixels redrawn) < uniform noise, 64 samples (a grid in MLflow, PNGs in --out_dir), and
sampling throughput in pixels/s at batch 1 and 64. For the convolutional priors it also times
the sampler running the full network at every pixel against the row crop it uses (only the
rows the pixel's outputs read).

Everything runs in --out_dir (demo data, an sqlite MLflow store, its artifacts): afterwards
`cd <out_dir> && mlflow ui` shows the runs side by side (experiment `bench_pixelcnn`).
Timings depend on what else the machine runs; on a shared machine compare them as ratios.
"""

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch

from pixelcnn.base import ConvPrior

CONV_FAMILIES = ["pixelcnn", "gated_pixelcnn", "pixelcnnpp", "pixelsnail"]
# the GPT: docs/gpt.md's small prior, at the same tokens (dropout 0: on the CPU, attention
# dropout forces the unfused attention path and costs more than the rest of the step)
GPT_FLAGS = {"n_layer": 4, "n_head": 4, "n_embd": 64, "dropout": 0.0}
GPT_TRAIN = {"batch_size": 32, "learning_rate": 2e-3, "weight_decay": 0.0}
FIVE_MINUTES = 300.0


# helpers

def prepare_data(out_dir, experiment):
    """Demo digits -> a `pixels` levels tokenizer run (4 bits) with train and held-out codes."""
    from pipeline.demo_data import write_digits
    from pipeline.tokenizers import fit_tokenizer, quantize
    train_csv, heldout_csv = write_digits(out_dir / "demo_data")
    tokenizer = fit_tokenizer("pixels", {"mode": "levels", "bits": 4},
                              {"path_to_data": str(train_csv), "experiment": experiment})
    quantize(tokenizer, str(heldout_csv))
    return tokenizer, heldout_csv


def timed_gpt_steps(tokens, steps=3):
    """Seconds per training step of the benchmark's GPT on a batch of real tokens."""
    import priors
    model = priors.build("gpt", {**GPT_FLAGS, "vocab_size": 16, "grid_h": 16, "grid_w": 16})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tokens[:GPT_TRAIN["batch_size"]]
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        _, loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds[1:])[len(seconds[1:]) // 2]


def ranking(model, heldout_tokens, seed=0):
    """Mean bits/dim of held-out digits, of the same digits with a fifth of their pixels
    redrawn uniformly, and of uniform noise: a likelihood that can tell ranks them in order."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    redraw = torch.rand(heldout_tokens.shape, generator=generator) < 0.2
    degraded = torch.where(redraw, torch.randint(vocab, heldout_tokens.shape,
                                                 generator=generator), heldout_tokens)
    noise = torch.randint(vocab, heldout_tokens.shape, generator=generator)
    dims = heldout_tokens[0].numel()
    with torch.no_grad():
        return [model.nll(t).mean().item() / (dims * math.log(2))
                for t in (heldout_tokens, degraded, noise)]


@torch.no_grad()
def pixels_per_second(model, batch, sampler=None, positions=None):
    """Draw the first `positions` pixels (default: all) of `batch` images with the raster loop
    of priors/sampling.py; `sampler` (begin, step) stands in for the model's; pixels/s."""
    from priors.sampling import sample_position
    begin, step = sampler or (model.begin, model.step)
    positions = positions or model.positions
    tokens = torch.zeros(batch, model.positions, model.head.channels, dtype=torch.long)
    torch.manual_seed(0)
    start = time.perf_counter()
    state = begin(batch, model.labels_for(batch, None, tokens.device))
    for p in range(positions):
        tokens[:, p] = sample_position(model.head, step(state, p, tokens))
    return batch * positions / (time.perf_counter() - start)


def full_forward(model):
    """A sampler (begin, step) that runs the whole network on the whole grid for every pixel."""
    def step(state, p, tokens):
        grid = tokens.view(tokens.shape[0], model.height, model.width, -1)
        return model.network(grid, state["label"])[:, :, p // model.width, p % model.width]
    return partial(ConvPrior.begin, model), step


def row_crop(model):
    """The sampler (begin, step) that runs the network on the rows a pixel's outputs read."""
    return partial(ConvPrior.begin, model), partial(ConvPrior.step, model)


def table(rows, header):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# main

def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="bench_pixelcnn_out")
    parser.add_argument("--families", nargs="+", default=CONV_FAMILIES + ["gpt"],
                        choices=CONV_FAMILIES + ["gpt"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="a fifth of each family's training steps, 16 samples")
    parser.add_argument("--max_steps", type=int,
                        help="train every family this many steps instead (a smoke run)")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--full_forward_pixels", type=int, default=32,
                        help="pixels drawn to time the full-forward sampler (it is slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(out_dir)  # the sqlite store and its mlruns/ artifacts live here
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out_dir / 'mlflow.db'}")
    experiment = "bench_pixelcnn"

    import priors
    from pipeline import tracking
    from pipeline.codes import load_run_codes
    from pipeline.evaluate import evaluate
    from pipeline.generate import LoadedPrior, generate
    from pipeline.train_prior import train_prior

    num_samples = 16 if args.quick else args.num_samples
    print(f"torch threads {torch.get_num_threads()}, out_dir {out_dir}", flush=True)
    tokenizer, heldout_csv = prepare_data(out_dir, experiment)
    train_tokens, _ = load_run_codes(tokenizer, "train")
    heldout_tokens, _ = load_run_codes(tokenizer, "heldout")

    results = {}
    order = [f for f in args.families if f != "gpt"] + (["gpt"] if "gpt" in args.families else [])
    for name in order:
        model_flags = {}
        train_flags = {"prior": name, "run_id": tokenizer, "codes": "train",
                       "experiment": experiment}
        if name == "gpt":  # about the wall time of the slowest convolutional prior
            budget = (max(r["train_s"] for r in results.values()) if results else
                      FIVE_MINUTES / (5 if args.quick else 1))
            step_s = timed_gpt_steps(train_tokens)
            steps = max(10, int(0.9 * budget / step_s))  # ~10% goes to evaluations
            print(f"gpt: {step_s:.2f} s per step -> {steps} steps for {budget:.0f} s", flush=True)
            model_flags.update(GPT_FLAGS)
            train_flags.update(GPT_TRAIN, max_steps=steps, eval_every=max(1, steps // 4))
        else:
            steps = priors.family(name).TRAIN_DEFAULTS["max_steps"]
            if args.quick or args.max_steps:
                steps = args.max_steps or max(10, steps // 5)
                train_flags.update(max_steps=steps, eval_every=max(1, steps // 4))
        start = time.perf_counter()
        run_id = train_prior(model_flags, train_flags)
        train_s = time.perf_counter() - start
        metrics = tracking.client().get_run(run_id).data.metrics
        heldout = evaluate(run_id, str(heldout_csv), name="heldout")["bits_per_dim"]
        model = LoadedPrior(run_id, torch.device("cpu")).model
        seconds = generate(run_id, num_samples=num_samples, seed=0, name="bench",
                           out_dir=str(out_dir / "samples" / name)).seconds
        result = {"run_id": run_id, "steps": steps, "train_s": train_s,
                  "params": sum(p.numel() for p in model.parameters()),
                  "val_bits_per_dim": metrics["val/bits_per_dim"],
                  "heldout_bits_per_dim": heldout, "ranking": ranking(model, heldout_tokens),
                  "pixels_per_s": {1: pixels_per_second(model, 1),
                                   num_samples: num_samples * model.positions / seconds}}
        if name != "gpt":  # against the whole network run at every pixel
            result["full_forward_pixels_per_s"] = {
                b: pixels_per_second(model, b, full_forward(model), args.full_forward_pixels)
                for b in (1, num_samples)}
            if type(model).step is not ConvPrior.step:  # a family with its own cached sampler
                result["row_crop_pixels_per_s"] = {
                    b: pixels_per_second(model, b, row_crop(model)) for b in (1, num_samples)}
        results[name] = result
        print(f"{name}: {train_s:.0f} s, val {result['val_bits_per_dim']:.4f} bits/dim, "
              f"held-out {heldout:.4f}", flush=True)

    print("\ntraining on 1,350 digits (16x16, 16 grey levels), validation on 150, held-out 297")
    print(table([[name, f"{r['params']:,}", r["steps"], f"{r['train_s']:.0f}",
                  "yes" if r["train_s"] <= FIVE_MINUTES else "NO",
                  f"{r['val_bits_per_dim']:.4f}", f"{r['heldout_bits_per_dim']:.4f}",
                  " < ".join(f"{x:.2f}" for x in r["ranking"]),
                  "yes" if r["ranking"][0] < r["ranking"][1] < r["ranking"][2] else "NO"]
                 for name, r in results.items()],
                ["prior", "params", "steps", "train s", "<= 5 min", "val bits/dim",
                 "held-out bits/dim", "held-out < degraded < noise", "ordered"]))
    print(f"\nsampling, pixels/s at batch 1 and {num_samples}, against running the whole "
          f"network at every pixel (timed over the first {args.full_forward_pixels} pixels)")
    rows = []
    for name, r in results.items():
        full = r.get("full_forward_pixels_per_s")
        samplers = [("KV cache" if name == "gpt" else
                     "cached inputs" if "row_crop_pixels_per_s" in r else "row crop",
                     r["pixels_per_s"])]
        if "row_crop_pixels_per_s" in r:
            samplers.append(("row crop", r["row_crop_pixels_per_s"]))
        for sampler, rate in samplers:
            rows.append([name, sampler, f"{rate[1]:.0f}", f"{rate[num_samples]:.0f}"] +
                        ([f"{full[1]:.0f}", f"{full[num_samples]:.0f}",
                          f"{rate[1] / full[1]:.1f}x", f"{rate[num_samples] / full[num_samples]:.1f}x"]
                         if full else ["-"] * 4))
    b = num_samples
    print(table(rows, ["prior", "sampler", "b1", f"b{b}", "full fwd b1", f"full fwd b{b}",
                       "gain b1", f"gain b{b}"]))
    (out_dir / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\nsamples: {out_dir / 'samples'}/<prior>/grid.png; runs: cd {out_dir} && mlflow ui "
          f"(experiment {experiment}); figures: {out_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
