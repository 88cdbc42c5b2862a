"""Training recipes for the demo's class-conditional GPT, compared on the VALIDATION split: the
experiments behind docs/results.md that need no flag of train.py.

    python -m experiments.prior_recipes --vqvae_run_id <VQ-VAE> --path_to_data demo_data/train.csv
    python -m experiments.prior_recipes ... --token_noise 0.1          # corrupted input tokens
    python -m experiments.prior_recipes ... --soft_codes 0.1           # re-drawn encodings
    python -m experiments.prior_recipes ... --shifts 1 --shift_share 0.3 --dropout 0.1  # DistAug

Trains the preset's prior (4 layers of 128, dropout 0.3, 2,400 steps of 64, AdamW 6e-4 with
warmup and cosine, the best validation checkpoint) on the codes of the VQ-VAE's training split,
with optionally:
- `--token_noise p`: while training, a share p of the input tokens replaced by random codes,
  the targets clean (against sampling's exposure to its own mistakes);
- `--soft_codes tau`: each step, every training sequence re-encoded position by position as
  code k with probability proportional to exp(-gap_k / tau), gap_k the squared distance from
  the encoder's output to code k minus that to the nearest (many near-equivalent encodings of
  each image instead of one; tau 0.1 moves 6% of the demo's positions for 0.2 dB of PSNR);
- `--shifts s`: DistAug (Jun et al. 2020): the training images also shifted by up to s pixels,
  each shift a condition beside the class (label = shift * classes + class), sampled with the
  unshifted condition; `--shift_share` is the share of shifted examples (default: uniform).
Then prints the validation nats per token and, for temperature x guidance, the quality figures
of 300 samples (30 per class) against the validation rows: the mean over `--seeds`, with the
seeds' standard deviation of FD ratio. Compare recipes at matched confidence; the training
`--seed` alone moves the FD ratio by about 0.05.
"""

import argparse
import copy
import itertools
import time

import torch

from pipeline.generate import sample_tokens
from pipeline.quality import QualityReference, report_draws
from pipeline.run import load_split_images
from pipeline.schedule import learning_rate_at
from pipeline.tokenizers import load_tokenizer
from transformer.gpt import GPT, GPTConfig
from vqvae.quantizer import squared_distances


def shifted(images, dy, dx):
    """(N, C, S, S) moved dy rows down and dx columns right, the uncovered border black."""
    out = torch.zeros_like(images)
    size = images.shape[-1]
    def spans(d):  # (source, destination) slices along one axis
        return ((slice(0, size - d), slice(d, size)) if d >= 0 else
                (slice(-d, size), slice(0, size + d)))
    (row_from, row_to), (col_from, col_to) = spans(dy), spans(dx)
    out[..., row_to, col_to] = images[..., row_from, col_from]
    return out


@torch.no_grad()
def code_gaps(vqvae, images):
    """(N, C, S, S) -> (N, h, w, K): each position's squared distance to every code, minus
    that to the nearest code (0 for the code the tokenizer picks)."""
    z = vqvae.encoder(images * 2 - 1).permute(0, 2, 3, 1)  # (N, h, w, D)
    distances = squared_distances(z.reshape(-1, z.shape[-1]), vqvae.quantizer.codebook)
    distances = distances.view(*z.shape[:3], -1)
    return distances - distances.min(-1, keepdim=True).values


def train(args, codes, labels, val_codes, val_labels, num_classes, vocab_size, gaps=None):
    """codes (A, N, h, w): variant 0 unshifted. -> the best-validation model, its nats/token."""
    variants, n = codes.shape[:2]
    config = GPTConfig(vocab_size=vocab_size, grid_h=codes.shape[2], grid_w=codes.shape[3],
                       num_classes=variants * num_classes, n_layer=4, n_head=4,
                       n_embd=args.n_embd, dropout=args.dropout)
    torch.manual_seed(args.seed)
    model = GPT(config)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                   {"params": others, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    best, best_state, batch = float("inf"), None, 64
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, 6e-4, args.steps)
        rows = torch.randint(n, (batch,), generator=generator)
        if args.shift_share is None:
            variant = torch.randint(variants, (batch,), generator=generator)
        else:
            moved = torch.rand(batch, generator=generator) < args.shift_share
            other = torch.randint(1, max(variants, 2), (batch,), generator=generator)
            variant = torch.where(moved, other, 0).clamp(max=variants - 1)
        target = codes[variant, rows].reshape(batch, -1)
        if gaps is not None:  # another near-equivalent encoding of each image (variant 0 only)
            weights = torch.softmax(-gaps[rows] / args.soft_codes, -1).reshape(-1, vocab_size)
            target = torch.multinomial(weights, 1, generator=generator).view(batch, -1)
        inputs = model._inputs(target)
        if args.token_noise:
            swap = torch.rand(inputs.shape, generator=generator) < args.token_noise
            swap[:, 0] = False  # never the start token
            noise = torch.randint(vocab_size, inputs.shape, generator=generator)
            inputs = torch.where(swap, noise, inputs)
        model.train()
        label = model.training_labels(variant * num_classes + labels[rows], batch, "cpu")
        loss = model.head.nll(model._run(inputs, labels=label), target[..., None]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            model.eval()
            with torch.no_grad():
                val = model(val_codes, val_labels)[1].item()  # unshifted: labels 0..classes-1
            if val < best:
                best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), best


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae_run_id", required=True)
    parser.add_argument("--path_to_data", required=True, help="the labelled training CSV")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--token_noise", type=float, default=0.0)
    parser.add_argument("--shifts", type=int, default=0)
    parser.add_argument("--soft_codes", type=float, default=0.0,
                        help="tau: train on codes drawn from softmax(-gap / tau) of each "
                             "position's squared distances to the codes (0: the nearest code)")
    parser.add_argument("--shift_share", type=float)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.25])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.15, 1.3, 1.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    if args.soft_codes and args.shifts:
        parser.error("--soft_codes re-draws the unshifted codes only; leave out --shifts")

    tokenizer = load_tokenizer(args.vqvae_run_id, "cpu")
    train_images, val_images, train_labels, val_labels = load_split_images(
        args.vqvae_run_id, args.path_to_data)
    if train_labels is None:
        raise SystemExit(f"{args.path_to_data}: needs a label column")
    classes = sorted({str(v) for v in train_labels})
    label_ids = lambda values: torch.tensor([classes.index(str(v)) for v in values])
    span = range(-args.shifts, args.shifts + 1)
    moves = [(0, 0)] + [m for m in itertools.product(span, repeat=2) if m != (0, 0)]
    codes = torch.stack([tokenizer.encode(shifted(train_images, *m)) for m in moves])
    gaps = None
    if args.soft_codes:
        gaps = code_gaps(tokenizer.model, train_images)  # (N, h, w, K)
        weights = torch.softmax(-gaps / args.soft_codes, -1)
        print(f"soft codes: {1 - weights.max(-1).values.mean():.3f} of the positions drawn off "
              f"the nearest code (expected)")
    start = time.perf_counter()
    model, val_nats = train(args, codes, label_ids(train_labels), tokenizer.encode(val_images),
                            label_ids(val_labels), len(classes), tokenizer.vocab_size, gaps)
    print(f"validation nats/token {val_nats:.4f} (trained in {time.perf_counter() - start:.0f} s)")

    reference = QualityReference(val_images, train_images, train_labels, val_labels)
    drawn = torch.arange(300) % len(classes)
    requested = [classes[i] for i in drawn.tolist()]
    print("| temperature | guidance | conf | P (real) | R (real) | FD ratio | nn ratio | agree |")
    print("|---|---|---|---|---|---|---|---|")
    for temperature, guidance in itertools.product(args.temperature, args.guidance):
        draws = []
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(seed)
            draws.append(tokenizer.decode(sample_tokens(
                model, 300, 300, drawn, generator, temperature=temperature,
                guidance=None if guidance == 1 else guidance)))
        r = report_draws(reference, draws, requested)
        print(f"| {temperature} | {guidance} | {r['classifier_confidence']:.3f} | "
              f"{r['precision']:.3f} ({r['real_precision']:.3f}) | {r['recall']:.3f} "
              f"({r['real_recall']:.3f}) | {r['fd_ratio']:.3f} ± {r.get('fd_ratio_sd', 0):.3f} | "
              f"{r['nn_ratio']:.2f} | {r['label_agreement']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
