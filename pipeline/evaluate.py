"""Likelihood of held-out images under a prior: `python -m pipeline evaluate`.

Each image of the CSV is encoded with the prior's tokenizer and scored by the prior's `nll`.
Figures are in bits per image dimension (pixels x channels), so priors over different
tokenizers compare. For a prior whose nll is a bound (absorbing diffusion's ELBO) the figure is
a Monte-Carlo estimate averaged over `elbo_samples` draws per image, and says so.
"""

import math
import sys
import tempfile
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.device import autocast, pick_device
from pipeline.generate import LoadedPrior
from pipeline.images import ImageData, read_table


@torch.no_grad()
def image_nll(model, tokens, labels, elbo_samples=1, batch_size=256, seed=0, precision="fp32"):
    """(N,) nats per image; bounds averaged over `elbo_samples` Monte-Carlo draws. The forward
    runs in `precision` (resolved, pipeline/device.py); the nll is taken on fp32 outputs
    (priors/heads.py) and summed in fp32."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    draws = elbo_samples if model.nll_is_bound else 1
    out = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        batch_labels = labels[start:start + batch_size].to(device) if labels is not None else None
        with autocast(device, precision):
            total = sum(model.nll(batch, batch_labels, generator=generator).float()
                        for _ in range(draws))
        out.append((total / draws).cpu())
    return torch.cat(out)


def evaluate(run_id, path_to_data, name=None, elbo_samples=8, batch_size=256, seed=0,
             device=None, precision="auto"):
    """Log eval/<name>/bits_per_dim (and nats_per_image) to the prior run, and the per-image
    figures as eval/<name>.csv. precision: auto | fp32 | bf16 (pipeline/device.py), recorded
    in eval/<name>.json. Returns the summary dict."""
    import pandas as pd
    from core.errors import UserError
    if elbo_samples < 1:
        raise UserError(f"--elbo_samples must be at least 1, got {elbo_samples}")
    device = pick_device(device)
    prior = LoadedPrior(run_id, device, precision=precision)
    run_id, tokenizer = prior.run_id, prior.tokenizer()
    table = read_table(path_to_data)
    data = ImageData(table, tokenizer.in_channels, tokenizer.image_size)
    images = torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255
    tokens = tokenizer.encode(images)
    labels, conditioned = None, "none"
    if prior.classes:
        if data.table.labels is not None:
            labels, conditioned = prior.class_ids(data.table.labels, f"{path_to_data}"), "label"
        else:
            conditioned = f"null label (no {table.label_source})"
    nll = image_nll(prior.model, tokens, labels, elbo_samples, batch_size, seed,
                    prior.precision)
    bits = nll / (tokenizer.image_dims * math.log(2))
    name = name or Path(path_to_data).stem
    summary = {"run_id": run_id, "bits_per_dim": bits.mean().item(),
               "nats_per_image": nll.mean().item(),
               "num_images": len(nll), "bound": prior.model.nll_is_bound,
               "elbo_samples": elbo_samples if prior.model.nll_is_bound else None,
               "conditioned_on": conditioned, "csv": str(path_to_data),
               "precision": prior.precision}
    tracking.log_metrics(run_id, {f"eval/{name}/bits_per_dim": summary["bits_per_dim"],
                                  f"eval/{name}/nats_per_image": summary["nats_per_image"]}, 0)
    frame = pd.DataFrame({"row": [r + 1 for r in data.table.rows],
                          "image_path": [str(p) for p in data.table.paths],
                          "label": data.table.labels if data.table.labels is not None
                          else [None] * len(nll),
                          "nll_nats": nll.numpy(), "bits_per_dim": bits.numpy()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.csv"
        frame.to_csv(path, index=False)
        tracking.log_artifact(run_id, path, "eval")
    tracking.log_json(run_id, summary, f"eval/{name}.json")
    kind = (f"Monte-Carlo ELBO bound, {elbo_samples} draws per image"
            if prior.model.nll_is_bound else "exact")
    print(f"{name}: {summary['bits_per_dim']:.4f} bits/dim ({kind}) over {len(nll)} images",
          file=sys.stderr)
    return summary
