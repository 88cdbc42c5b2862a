"""Image GPT's probes (Chen et al. 2020): what a prior trained only to generate knows about the
classes of images. `python -m pipeline probe --run_id <prior> --path_to_data labelled.csv
[--heldout labelled_test.csv] [--finetune]`.

- Linear probe: an image's feature at layer l is the residual stream after block l (layer 0:
  the input embeddings), average-pooled over positions. One logistic regression per layer is
  fitted on the training split; the layer (and the regularisation C) with the best validation
  accuracy is chosen, and only it is scored on the held-out images.
- Fine-tuning (--finetune): a classifier (LayerNorm + linear) on the average-pooled last layer,
  trained together with the prior on L = L_class + aux_weight * L_generative (the prior's own
  loss on the same images, kept as an auxiliary term as Image GPT does); the evaluation with
  the best validation accuracy is scored on the held-out images, and its weights are logged
  as the MLflow Model `classifier` (pipeline/classify.py; --register NAME registers it).
- Baseline: the same logistic regression on the raw pixels, same splits and choice of C.

Every prior with per-layer features can be probed (`hidden_states`: the GPT's causal streams,
the absorbing prior's with no token masked); the convolutional families have none.

Splits (fixed seed): without --heldout the CSV is cut into train / validation / held-out; with
it, the CSV into train / validation, and every --heldout image is held out. Held-out images
choose nothing: not the layer, not C, not the fine-tuning step.

The run: stage `probe`, tags `pipeline.prior_run_id` and `pipeline.tokenizer_run_id`, the
accuracies as metrics (`*/heldout_accuracy`), `probe.json` with the per-layer table.
"""

import copy
import inspect
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import priors
from pipeline import tracking
from pipeline.classify import Classifier, PooledClassifier, log_classifier
from pipeline.device import pick_device
from core.errors import UserError
from pipeline.generate import LoadedPrior
from pipeline.images import ImageData, read_table, split_indices
from pipeline.train_prior import class_names

PRIOR_RUN_TAG = "pipeline.prior_run_id"
C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strengths tried for every logistic regression


# helpers

def read_labelled(path, tokenizer):
    """(images (N, C, S, S) in [0, 1], labels as written) of a CSV with a `label` column, or
    of a folder with class subfolders."""
    table = read_table(path)
    if table.labels is None:
        raise UserError(f"{path}: has no {table.label_source}; the probe needs labelled images")
    data = ImageData(table, tokenizer.in_channels, tokenizer.image_size)
    for row, value in zip(data.table.rows, data.table.labels):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise UserError(f"{path}: row {row + 1} has no label; the probe needs every image "
                            f"labelled")
    images = torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255
    return images, [str(v) for v in data.table.labels]


def make_splits(n, heldout_n, val_fraction, heldout_fraction, seed):
    """Index arrays (train, val, heldout) into the concatenation [CSV rows | --heldout rows]."""
    if heldout_n:
        train, val = split_indices(n, val_fraction, seed)
        return train, val, np.arange(n, n + heldout_n)
    rest, heldout = split_indices(n, heldout_fraction, seed)
    train, val = split_indices(len(rest), val_fraction, seed + 1)
    return rest[train], rest[val], heldout


@torch.no_grad()
def pooled_features(model, tokens, device, batch_size=128):
    """(N, h, w) tokens -> (n_layer + 1, N, n_embd) numpy: each layer's stream averaged over
    positions (the null label for a conditional prior: the probe must not see the class)."""
    layers = []
    for start in range(0, len(tokens), batch_size):
        hidden = model.hidden_states(tokens[start:start + batch_size].to(device))
        layers.append(torch.stack([h.float().mean(1) for h in hidden]).cpu())
    return torch.cat(layers, 1).numpy()


def fit_logistic(x_train, y_train, x_val, y_val, seed):
    """The standardised logistic regression with the best validation accuracy over C_GRID;
    -> (model, validation accuracy, train accuracy, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    best = None
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000,
                                                                   random_state=seed))
        model.fit(x_train, y_train)
        val = model.score(x_val, y_val)
        if best is None or val > best[1]:
            best = (model, val, model.score(x_train, y_train), c)
    return best


def linear_probes(features, y, splits, seed):
    """features (layers, N, width), labels y (N,): one probe per layer fitted on the training
    split -> (per-layer rows, the row chosen on validation, its held-out accuracy)."""
    train, val, heldout = splits
    layers = []
    for layer, x in enumerate(features):
        model, val_accuracy, train_accuracy, c = fit_logistic(x[train], y[train], x[val], y[val],
                                                              seed)
        layers.append({"layer": layer, "val_accuracy": val_accuracy,
                       "train_accuracy": train_accuracy, "C": c, "model": model})
    best = max(layers, key=lambda row: row["val_accuracy"])  # the first of equals: shallowest
    x = features[best["layer"]]
    return layers, best, best["model"].score(x[heldout], y[heldout])


# fine-tuning

def features_and_loss(model, tokens):
    """A training batch's last layer (B, T, width) and generative loss. One pass where forward
    also gives the streams (the GPT's: causal, as when evaluated); else the loss, then the
    streams of the whole grid (the absorbing prior's loss masks tokens at random, and the
    classifier reads them all, as when evaluated)."""
    if "hidden" in inspect.signature(model.forward).parameters:
        hidden = []
        _, loss = model(tokens, hidden=hidden)
        return hidden[-1], loss
    _, loss = model(tokens)
    return model.hidden_states(tokens)[-1], loss


def finetune(prior, tokens, labels, splits, width, num_classes, device, steps=300,
             batch_size=32, learning_rate=1e-3, aux_weight=1.0, eval_every=50, seed=0, log=None):
    """Train a copy of the prior (features `width` wide) and a PooledClassifier on the
    training split; return (validation accuracy, held-out accuracy, step, the prior's copy,
    the classifier) of the evaluation with the best validation accuracy, in eval mode."""
    train, val, heldout = (torch.as_tensor(s) for s in splits)
    torch.manual_seed(seed)
    model = copy.deepcopy(prior).to(device).train()
    classifier = PooledClassifier(width, num_classes).to(device)
    parameters = list(model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def accuracy(index):
        model.eval()
        right = 0
        for chunk in index.split(128):
            hidden = model.hidden_states(tokens[chunk].to(device))
            right += (classifier(hidden[-1]).argmax(1).cpu() == labels[chunk]).sum().item()
        model.train()
        return right / len(index)

    best = (-1.0, None, 0)  # (validation accuracy, weights, step)
    for step in range(1, steps + 1):
        pick = train[torch.randint(len(train), (batch_size,), generator=generator)]
        last, generative = features_and_loss(model, tokens[pick].to(device))
        classification = F.cross_entropy(classifier(last), labels[pick].to(device))
        loss = classification + aux_weight * generative
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            val_accuracy = accuracy(val)
            if log:
                log({"finetune/train_class_loss": classification.item(),
                     "finetune/train_generative_loss": generative.item(),
                     "finetune/val_accuracy": val_accuracy}, step)
            if val_accuracy > best[0]:
                weights = (copy.deepcopy(model.state_dict()), copy.deepcopy(classifier.state_dict()))
                best = (val_accuracy, weights, step)
    model.load_state_dict(best[1][0])
    classifier.load_state_dict(best[1][1])
    return best[0], accuracy(heldout), best[2], model.eval(), classifier.eval()


# main function

def probe(run_id, path_to_data, heldout=None, val_fraction=0.15, heldout_fraction=0.2,
          finetune_steps=None, finetune_lr=1e-3, aux_weight=1.0, batch_size=32, seed=0,
          device=None, experiment=None, register=None):
    """Probe a prior run; log a `probe` run; return (probe run id, summary dict).
    finetune_steps None: no fine-tuning; with it, the fine-tuned classifier is logged to the
    probe run as an MLflow Model, registered as `register` when given."""
    for name, value in (("--val_fraction", val_fraction), ("--heldout_fraction", heldout_fraction)):
        if not 0 < value < 1:
            raise UserError(f"{name} must be in (0, 1), got {value}")
    device = pick_device(device)
    prior = LoadedPrior(run_id, device)
    run_id = prior.run_id  # a models:/ URI resolved to its run
    if not hasattr(prior.model, "hidden_states"):
        probed = [name for name in priors.FAMILIES
                  if hasattr(priors.family(name).Model, "hidden_states")]
        raise UserError(f"--run_id {run_id}: the {prior.family} prior has no per-layer "
                        f"features to probe (the {' and '.join(probed)} priors have)")
    if register and not finetune_steps:
        raise UserError("--register NAME registers the fine-tuned classifier: add --finetune")
    tokenizer = prior.tokenizer()
    images, names = read_labelled(path_to_data, tokenizer)
    heldout_n = 0
    if heldout:  # appended: splits index [CSV rows | --heldout rows]
        heldout_images, heldout_names = read_labelled(heldout, tokenizer)
        images, names = torch.cat([images, heldout_images]), names + heldout_names
        heldout_n = len(heldout_names)
    classes, labels = class_names(names, str(path_to_data))
    splits = make_splits(len(images) - heldout_n, heldout_n, val_fraction, heldout_fraction, seed)
    train, val, test = splits
    if min(len(train), len(val), len(test)) == 0:
        raise UserError(f"{path_to_data}: too few images ({len(images)}) for a train, a "
                        f"validation and a held-out split")
    y = labels.numpy()
    if len(np.unique(y[train])) < 2:
        raise UserError(f"{path_to_data}: the probe's training split holds one class only "
                        f"('{classes[y[train][0]]}'); a probe needs labels of two classes or more")
    tokens = tokenizer.encode(images)
    started = time.perf_counter()

    features = pooled_features(prior.model, tokens, device)
    layers, best, probe_heldout = linear_probes(features, y, splits, seed)
    pixels = images.flatten(1).numpy()
    raw, raw_val, _, raw_c = fit_logistic(pixels[train], y[train], pixels[val], y[val], seed)
    raw_heldout = raw.score(pixels[test], y[test])

    config = prior.model.config
    params = {"prior_run_id": run_id, "tokenizer_run_id": prior.tokenizer_run_id,
              "prior_family": prior.family, "attention": getattr(config, "attention", None),
              "path_to_data": str(path_to_data), "heldout": str(heldout) if heldout else None,
              "val_fraction": val_fraction, "heldout_fraction": None if heldout else heldout_fraction,
              "num_train": len(train), "num_val": len(val), "num_heldout": len(test),
              "num_classes": len(classes), "seed": seed, "finetune_steps": finetune_steps,
              "finetune_lr": finetune_lr, "aux_weight": aux_weight, "batch_size": batch_size}
    tags = {PRIOR_RUN_TAG: run_id, tracking.TOKENIZER_RUN_TAG: prior.tokenizer_run_id or ""}
    probe_run = tracking.create_run("probe", experiment, tags=tags)
    status = "FAILED"
    try:
        tracking.log_params(probe_run, params)
        metrics = {"linear_probe/heldout_accuracy": probe_heldout,
                   "linear_probe/val_accuracy": best["val_accuracy"],
                   "linear_probe/best_layer": best["layer"],
                   "raw_pixels/heldout_accuracy": raw_heldout, "raw_pixels/val_accuracy": raw_val}
        for row in layers:
            metrics[f"linear_probe/layer_{row['layer']}/val_accuracy"] = row["val_accuracy"]
            metrics[f"linear_probe/layer_{row['layer']}/train_accuracy"] = row["train_accuracy"]
        tracking.log_metrics(probe_run, metrics, 0)
        summary = {"classes": classes, "layers": [{k: v for k, v in row.items() if k != "model"}
                                                  for row in layers],
                   "best_layer": best["layer"], "linear_probe_heldout_accuracy": probe_heldout,
                   "raw_pixels_heldout_accuracy": raw_heldout, "raw_pixels_C": raw_c,
                   **params}
        if finetune_steps:
            log = lambda values, step: tracking.log_metrics(probe_run, values, step)
            tune_val, tune_heldout, tune_step, tuned, head = finetune(
                prior.model, tokens, labels, splits, features.shape[2], len(classes), device,
                finetune_steps,
                batch_size, finetune_lr, aux_weight, seed=seed, log=log)
            tracking.log_metrics(probe_run, {"finetune/heldout_accuracy": tune_heldout,
                                             "finetune/best_val_accuracy": tune_val,
                                             "finetune/best_step": tune_step}, finetune_steps)
            summary.update(finetune_heldout_accuracy=tune_heldout, finetune_val_accuracy=tune_val,
                           finetune_best_step=tune_step)
            summary["classifier_uri"], summary["registered_version"] = log_classifier(
                probe_run, Classifier(tuned, head, classes, tokenizer), prior, register,
                summary)
        summary["seconds"] = time.perf_counter() - started
        tracking.log_json(probe_run, summary, "probe.json")
        status = "FINISHED"
    finally:
        tracking.end_run(probe_run, status)
    report(summary)
    return probe_run, summary


def report(summary):
    lines = [f"{'layer':>5} {'train acc':>9} {'val acc':>8} {'C':>5}"]
    for row in summary["layers"]:
        mark = "  <- best on validation" if row["layer"] == summary["best_layer"] else ""
        lines.append(f"{row['layer']:>5} {row['train_accuracy']:9.3f} {row['val_accuracy']:8.3f} "
                     f"{row['C']:>5}{mark}")
    lines.append(f"held-out accuracy ({summary['num_heldout']} images): linear probe on layer "
                 f"{summary['best_layer']} {summary['linear_probe_heldout_accuracy']:.3f}, raw "
                 f"pixels {summary['raw_pixels_heldout_accuracy']:.3f}" +
                 (f", fine-tuned {summary['finetune_heldout_accuracy']:.3f}"
                  if "finetune_heldout_accuracy" in summary else ""))
    print("\n".join(lines), file=sys.stderr)
