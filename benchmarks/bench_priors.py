"""The priors compared on the same VQ codes of the demo digits: one table of likelihood, sample
quality and sampling cost, logged to a `compare` MLflow run with mlflow's log_table.

    python -m benchmarks.bench_priors                        # ~15 minutes on 2 quiet CPU cores
    python -m benchmarks.bench_priors --tokenizer_run_id VQ --large_tokenizer_run_id VQ16
    python -m benchmarks.bench_priors --skip_large --prior_steps 300 --num_samples 128  # quick
    python -m benchmarks.bench_priors --small_gpt_run_id G --small_absorbing_run_id A \
        --large_gpt_run_id G16 --large_absorbing_run_id A16      # re-measure trained priors

Two code grids, each with a GPT (KV cache) and an absorbing prior of the same width and depth,
both trained class-conditionally (label dropout, so either can also sample without guidance):
    small  16x16 digits, the `small` preset's VQ-VAE (4x4 = 16 codes): the demo's setting
    large  32x32 digits, `--downsample 2` (16x16 = 256 codes), where parallel decoding matters
Rows: the GPT, and absorbing with each sampler at each of --steps. Per row: held-out bits per
image dimension (the GPT's exact; absorbing's the Monte-Carlo ELBO, an upper bound, the same
for both of its samplers), the quality figures (pipeline/quality.py) against the held-out
digits (samples drawn for the classes in turn, no guidance), the share of samples the
classifier assigns to the class they were drawn for, network evaluations per image, seconds per image at batch 1 and batch 64
and the share of the fp32 matmul peak (measured just before each row's timings, so a busy
machine's peak matches its timings) that the sampler's FLOPs reach.
Then the class-conditional figure: that share with and without --guidance, on the small grid.
The large grid's priors train for --large_prior_steps 200 only (its purpose is the cost of
sampling 256 codes; they do not yet draw digits): raise it for its quality columns to mean much.
Timings on a shared machine are noisy, and with several torch threads on a machine whose cores
are busy they can be wildly off (spinning threads wait on each other): use --threads 1 there,
and compare rows within one run.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_transformer import flops_per_token
from benchmarks.common import matmul_peak_flops
from pipeline import tracking
from pipeline.demo_data import write_digits
from pipeline.evaluate import image_nll
from pipeline.generate import LoadedPrior
from pipeline.images import ImageData, read_table, split_indices
from pipeline.quality import QualityReference
from pipeline.visual import image_grid, save_png

# The small preset's VQ-VAE (pipeline/run.py), and the same at 32x32 with 2x downsampling.
GRIDS = {"small": {"image_size": 16, "downsample": 4},
         "large": {"image_size": 32, "downsample": 2}}
# dropout per family at the small preset's width and depth: the GPT's from the preset; the
# absorbing prior's masking already regularises it (validation ELBO after 800 steps on the demo
# digits: 0.266 bits/dim at dropout 0.1, 0.274 at 0.3)
DROPOUT = {"gpt": 0.3, "absorbing": 0.1}
TABLE_KEYS = ("fd_ratio", "precision", "recall", "classifier_confidence", "classes_present")




# helpers

def vqvae_settings(grid, steps):
    from pipeline.run import PRESETS
    return {**PRESETS["small"]["vqvae"], **GRIDS[grid], "max_steps": steps}


def train_tokenizer(csv, grid, steps, experiment):
    from pipeline.tokenizers import quantize
    from vqvae.model import VQVAEConfig
    from pipeline.train_tokenizer import TrainConfig, train_vqvae
    settings = {**vqvae_settings(grid, steps), "path_to_data": str(csv), "experiment": experiment}
    model = {k: v for k, v in settings.items() if k in VQVAEConfig.__dataclass_fields__}
    train = {k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__}
    run_id = train_vqvae(model, train)
    quantize(run_id, str(csv), name="train")
    return run_id


def train_priors(tokenizer_run_id, args, steps, batch_size, experiment):
    from pipeline.train_prior import train_prior
    runs = {}
    for family in ("gpt", "absorbing"):
        model = {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                 "dropout": DROPOUT[family]}
        train = {"prior": family, "run_id": tokenizer_run_id, "codes": "train",
                 "conditional": True, "max_steps": steps, "batch_size": batch_size,
                 "learning_rate": 6e-4, "eval_every": max(1, steps // 4),
                 "checkpoint_every": steps, "experiment": experiment}
        runs[family] = train_prior(model, train)
    return runs


def load_images(tokenizer, csv, split=None):
    """Images of a CSV as floats in [0, 1] at the tokenizer's size, and their labels; with
    split=(val_fraction, seed), only the training split (the priors' split of the codes)."""
    data = ImageData(read_table(csv), tokenizer.in_channels, tokenizer.image_size)
    rows = range(len(data)) if split is None else split_indices(len(data), *split)[0]
    images = torch.cat(list(data.ordered(rows, 512))).float() / 255
    return images, [data.table.labels[i] for i in rows]


def sampler_flops(model, evaluations):
    """FLOPs of drawing one image: the GPT's cached steps (mean context half the grid, the head
    at every step); absorbing's full passes over the grid (blocks and attention; its head runs
    only where tokens are drawn, < 2% here)."""
    config, length = model.config, model.config.block_size
    if model.family == "gpt":
        return length * flops_per_token(config, length / 2)
    d, layers = config.n_embd, config.n_layer
    return evaluations * length * (2 * 12 * d * d * layers + 4 * length * d * layers)


def count_evaluations(model):
    """A list that grows by one per network evaluation (both families embed tokens once each)."""
    calls = []
    model.token_embedding.register_forward_hook(lambda *_: calls.append(1))
    return calls


def draw(model, labels, settings, generator):
    return model.sample(len(labels), labels=labels, generator=generator, **settings)


def measure_row(prior, settings, tokenizer, num_classes, args, generator):
    """Samples and timings of one sampler. -> (images, requested labels, figures dict)."""
    model = prior.model
    calls = count_evaluations(model)
    labels = torch.arange(args.num_samples) % num_classes
    with torch.no_grad():
        draw(model, labels[:1], settings, generator)  # warm-up
        calls.clear()
        start = time.perf_counter()
        for i in range(args.timing_images):
            draw(model, labels[i:i + 1], settings, generator)
        batch1 = (time.perf_counter() - start) / args.timing_images
        evaluations = len(calls) / args.timing_images
        chunks, batch64 = [], []
        for i in range(0, args.num_samples, 64):
            start = time.perf_counter()
            chunks.append(draw(model, labels[i:i + 64], settings, generator))
            if len(chunks[-1]) == 64:
                batch64.append((time.perf_counter() - start) / 64)
    codes = torch.cat(chunks)
    flops = sampler_flops(model, evaluations)
    figures = {"forward_passes": evaluations, "s_per_image_b1": batch1,
               "s_per_image_b64": float(np.mean(batch64)) if batch64 else float("nan"),
               "flops_per_image": flops}
    return tokenizer.decode(codes), labels, figures


def label_agreement(classifier, images, labels, classes):
    predicted, _ = classifier.predict(images)
    requested = np.asarray([classes[i] for i in labels.tolist()])
    return float((predicted == requested).mean())


def evaluate_grid(grid, prior_runs, args, out_dir):
    """Every row of one code grid, and (small grid) the class-conditional figure."""
    device = torch.device("cpu")
    priors = {family: LoadedPrior(run_id, device) for family, run_id in prior_runs.items()}
    tokenizer = priors["gpt"].tokenizer()
    train_config = tracking.load_json_artifact(prior_runs["gpt"], "config.json")["train"]
    train_images, train_labels = load_images(tokenizer, args.train_csv,
                                             (train_config["val_fraction"], train_config["seed"]))
    heldout, heldout_labels = load_images(tokenizer, args.heldout_csv)
    heldout_tokens = tokenizer.encode(heldout)
    # one reference for every row: the held-out features, the real-image figures and the
    # project's CNN classifier (pipeline.quality), fitted once on the training images
    reference = QualityReference(heldout, train_images, train_labels, heldout_labels,
                                 seed=args.seed)
    classifier = reference.classifier
    classes = priors["gpt"].classes
    num_samples = args.num_samples if grid == "small" else args.large_num_samples
    grid_args = argparse.Namespace(**{**vars(args), "num_samples": num_samples})

    rows, conditional = [], []
    for family, prior in priors.items():
        nll = image_nll(prior.model, heldout_tokens, prior.class_ids(heldout_labels, "held-out"),
                        args.elbo_samples)
        bits = (nll / (tokenizer.image_dims * math.log(2))).mean().item()
        kind = (f"ELBO bound, {args.elbo_samples} draws" if prior.model.nll_is_bound
                else "exact")
        samplers = ([("kv cache", None)] if family == "gpt" else
                    [(s, n) for s in ("absorbing", "maskgit") for n in args.steps
                     if n <= prior.model.config.block_size])
        for sampler, steps in samplers:
            settings = {} if family == "gpt" else {"sampler": sampler, "steps": steps}
            generator = torch.Generator().manual_seed(args.seed)
            peak = matmul_peak_flops(torch.device("cpu"), seconds=0.5)
            images, labels, figures = measure_row(prior, settings, tokenizer, len(classes),
                                                  grid_args, generator)
            quality = reference.report(images)
            row = {"grid": f"{tokenizer.grid[0]}x{tokenizer.grid[1]}", "prior": family,
                   "sampler": sampler, "steps": steps or prior.model.config.block_size,
                   "bits_per_dim": bits, "bits_kind": kind,
                   **{k: quality[k] for k in TABLE_KEYS if k in quality},
                   "label_agreement": label_agreement(classifier, images, labels, classes),
                   **figures,
                   "peak_b1": figures["flops_per_image"] / figures["s_per_image_b1"] / peak,
                   "peak_b64": figures["flops_per_image"] / figures["s_per_image_b64"] / peak,
                   "peak_gflops": peak / 1e9}
            rows.append(row)
            print(format_row(row), file=sys.stderr)
            name = f"{grid}-{family}-{sampler.replace(' ', '_')}-{row['steps']}"
            save_png(image_grid(images[:64], ncol=8), out_dir / f"{name}.png")

        if grid == "small":
            conditional += class_conditional(prior, tokenizer, classifier, classes, args)
    return rows, conditional


def class_conditional(prior, tokenizer, classifier, classes, args):
    """Share of samples drawn for class c that the classifier calls c, without and with
    guidance, for the prior's default sampler (and maskgit at 8 steps for absorbing)."""
    samplers = ([("kv cache", {})] if prior.family == "gpt" else
                [("absorbing", {"sampler": "absorbing"}),
                 ("maskgit", {"sampler": "maskgit", "steps": min(8, prior.model.config.block_size)})])
    labels = torch.arange(args.num_samples) % len(classes)
    out = []
    for sampler, settings in samplers:
        row = {"prior": prior.family, "sampler": sampler,
               "steps": settings.get("steps", prior.model.config.block_size)}
        for guidance in (None, args.guidance):
            generator = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                codes = torch.cat([draw(prior.model, labels[i:i + 64],
                                        {**settings, "guidance": guidance}, generator)
                                   for i in range(0, len(labels), 64)])
            share = label_agreement(classifier, tokenizer.decode(codes), labels, classes)
            row["no_guidance" if guidance is None else f"guidance_{guidance:g}"] = share
        out.append(row)
        print(f"  class-conditional {row}", file=sys.stderr)
    return out


def format_row(row):
    return (f"{row['grid']:>6} {row['prior']:>9} {row['sampler']:>9} {row['steps']:>4}  "
            f"{row['bits_per_dim']:.4f} b/d  fd {row.get('fd_ratio', float('nan')):6.2f}  "
            f"label {row['label_agreement']:.2f}  passes {row['forward_passes']:5.0f}  "
            f"b1 {row['s_per_image_b1'] * 1e3:8.1f} ms ({row['peak_b1']:5.1%})  "
            f"b64 {row['s_per_image_b64'] * 1e3:7.2f} ms ({row['peak_b64']:5.1%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="demo_data", help="where the demo digits are")
    parser.add_argument("--out_dir", default="bench_priors_out", help="sample grids, table CSV")
    parser.add_argument("--tokenizer_run_id", help="reuse this VQ-VAE (4x4 codes of 16x16 "
                                                   "digits, codes/train.npy) instead of training")
    parser.add_argument("--large_tokenizer_run_id", help="the same for the 16x16 code grid")
    for grid in ("small", "large"):
        for family in ("gpt", "absorbing"):
            parser.add_argument(f"--{grid}_{family}_run_id",
                                help=f"reuse this {family} prior on the {grid} grid's codes "
                                     f"(with the other family's; default: train both)")
    parser.add_argument("--vqvae_steps", type=int, default=600)
    parser.add_argument("--large_vqvae_steps", type=int, default=300)
    parser.add_argument("--prior_steps", type=int, default=800)
    parser.add_argument("--large_prior_steps", type=int, default=200)
    parser.add_argument("--large_batch_size", type=int, default=16)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--num_samples", type=int, default=320, help="samples per row (small)")
    parser.add_argument("--large_num_samples", type=int, default=64)
    parser.add_argument("--timing_images", type=int, default=5, help="images timed at batch 1")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--elbo_samples", type=int, default=8)
    parser.add_argument("--skip_large", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.train_csv, args.heldout_csv = write_digits(args.data_dir)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    grids = ["small"] + ([] if args.skip_large else ["large"])
    tokenizers = {"small": args.tokenizer_run_id, "large": args.large_tokenizer_run_id}
    rows, conditional, runs = [], [], {}
    for grid in grids:
        given = {family: getattr(args, f"{grid}_{family}_run_id") for family in ("gpt", "absorbing")}
        if all(given.values()):  # reuse both priors (and so their tokenizer)
            runs[grid] = given
            tokenizers[grid] = tracking.tokenizer_run_of(tracking.client().get_run(given["gpt"]))
        else:
            if not tokenizers[grid]:
                steps = args.vqvae_steps if grid == "small" else args.large_vqvae_steps
                tokenizers[grid] = train_tokenizer(args.train_csv, grid, steps, args.experiment)
            prior_steps, batch = ((args.prior_steps, 64) if grid == "small" else
                                  (args.large_prior_steps, args.large_batch_size))
            runs[grid] = train_priors(tokenizers[grid], args, prior_steps, batch, args.experiment)
        grid_rows, grid_conditional = evaluate_grid(grid, runs[grid], args, out_dir)
        rows += grid_rows
        conditional += grid_conditional

    import pandas as pd
    table, class_table = pd.DataFrame(rows), pd.DataFrame(conditional)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print("\n" + table.drop(columns=["flops_per_image"]).to_string(index=False,
                                                                   float_format="%.4g"))
    print("\nclass-conditional: share of samples classified as the class they were drawn for")
    print(class_table.to_string(index=False, float_format="%.3f"))
    headline = {}
    if "large" in runs:
        large = table[table.grid == "16x16"]
        gpt = large[large.prior == "gpt"].s_per_image_b1.iloc[0]
        for sampler in ("absorbing", "maskgit"):
            pick = large[(large.sampler == sampler) & (large.steps == 8)]
            if len(pick):
                headline[f"speedup_b1_256codes_{sampler}8"] = gpt / pick.s_per_image_b1.iloc[0]
        print("\n256 codes, batch 1: GPT with KV cache over absorbing at 8 steps: "
              + ", ".join(f"{k}: {v:.1f}x" for k, v in headline.items()))
    total = time.perf_counter() - started
    print(f"total {total / 60:.1f} min (timings on a shared machine are noisy)", file=sys.stderr)

    # the `compare` run: both tables, the sample grids, links to every run compared
    run_id = tracking.create_run("compare", args.experiment, run_name="bench_priors",
                                 tags={f"pipeline.{grid}.{k}_run_id": v for grid, r in runs.items()
                                       for k, v in {**r, "tokenizer": tokenizers[grid]}.items()})
    tracking.log_params(run_id, {k: v for k, v in vars(args).items()})
    tracking.log_metrics(run_id, {**headline, "total_min": total / 60},
                         step=0)
    tracking.client().log_table(run_id, data=table, artifact_file="comparison.json")
    tracking.client().log_table(run_id, data=class_table, artifact_file="class_conditional.json")
    table.to_csv(out_dir / "comparison.csv", index=False)
    class_table.to_csv(out_dir / "class_conditional.csv", index=False)
    tracking.log_artifacts(run_id, out_dir, "samples")
    tracking.end_run(run_id)
    print(f"run_id={run_id}")


if __name__ == "__main__":
    main()
