"""Image GPT's fine-tuned classifier as an MLflow Model, and the command that uses it.

`python -m pipeline probe --finetune` logs the classifier it fine-tuned to the probe run as the
MLflow Model `classifier` (pyfunc, models from code: pipeline/classifier_model.py, so nothing
is unpickled): the prior's weights after fine-tuning, the head (LayerNorm + linear on the
average-pooled last layer), the class names and the tokenizer the images go through, each a
weights-only checkpoint. `--register NAME` makes it a version of a registered model (alias
@champion).

A request is a table with one column, `image_png_base64`: one image per row, base64 (a PNG,
as the generator model answers, or any format PIL reads). Images are converted, resized and
center-cropped as a training CSV's are (pipeline/images.py), encoded by the tokenizer and
classified. The answer has one row per image: a column per class name with its probability,
and `label`, the likeliest class.

    python -m pipeline classify --model models:/NAME/VERSION --path_to_data images.csv \\
        [--out predictions.csv]

writes the predictions (image_path, the CSV's label where it has one, predicted, a column per
class) and prints the accuracy when the CSV has labels.
"""

import base64
import binascii
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

INPUT_COLUMN = "image_png_base64"
MODEL_NAME = "classifier"  # the logged model's name within the probe run
KIND = "classifier"        # the checkpoint's kind and the model's metadata `kind`
BATCH = 128                # images through the prior at once
REQUEST_ROWS = 256         # rows per predict call of `classify`


class PooledClassifier(nn.Module):
    """Class logits from the average-pooled last layer of the prior."""

    def __init__(self, width, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, last_layer):  # (B, T, width) -> (B, num_classes)
        return self.linear(self.norm(last_layer.mean(1)))


class Classifier:
    """A fine-tuned prior, its PooledClassifier head, the class names and the tokenizer:
    images -> class probabilities."""

    def __init__(self, prior, head, classes, tokenizer):
        self.prior, self.head, self.tokenizer = prior.eval(), head.eval(), tokenizer
        self.classes = [str(c) for c in classes]

    @classmethod
    def load(cls, prior_path, classifier_path, tokenizer_path, device=None):
        """From the three weights-only checkpoints the logged model holds."""
        import priors
        from pipeline.checkpoint import load_checkpoint
        from pipeline.device import pick_device
        from pipeline.tokenizers import tokenizer_from_checkpoint
        device = pick_device(device)
        prior = priors.from_checkpoint(load_checkpoint(prior_path, "prior")).to(device)
        checkpoint = load_checkpoint(classifier_path, KIND)
        head = PooledClassifier(**checkpoint["config"])
        head.load_state_dict(checkpoint["model"])
        tokenizer = tokenizer_from_checkpoint(load_checkpoint(tokenizer_path), device)
        return cls(prior, head.to(device), checkpoint["classes"], tokenizer)

    @torch.no_grad()
    def probabilities(self, images):
        """(N, C, S, S) floats in [0, 1] -> (N, classes) float64 numpy."""
        device = next(self.prior.parameters()).device
        tokens = self.tokenizer.encode(images)  # (N, h, w)
        chunks = []
        for chunk in tokens.split(BATCH):
            last = self.prior.hidden_states(chunk.to(device))[-1]  # (B, T, width)
            chunks.append(self.head(last).float().softmax(-1).cpu())
        return torch.cat(chunks).double().numpy()

    def images(self, requests):
        """The request table's images -> (N, C, S, S) floats; a RequestError names the row
        (the table's index) that is not an image."""
        from pipeline.images import decode_image
        if not hasattr(requests, "columns") or INPUT_COLUMN not in requests.columns:
            raise RequestError(f"the request needs a column `{INPUT_COLUMN}` (base64 images)")
        if len(requests) == 0:
            raise RequestError("no images in the request")
        arrays = []
        for row, value in zip(requests.index, requests[INPUT_COLUMN]):
            if not isinstance(value, str):
                raise RequestError(f"row {row}: `{INPUT_COLUMN}` must be a base64 string")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(f"row {row}: `{INPUT_COLUMN}` is not base64") from None
            try:
                arrays.append(decode_image(io.BytesIO(data), self.tokenizer.in_channels,
                                           self.tokenizer.image_size))
            except Exception as e:  # PIL's errors for data that is no image (or too large)
                detail = str(e).splitlines()[0][:200] if str(e) else "corrupt"
                raise RequestError(f"row {row}: cannot read the image ({type(e).__name__}: "
                                   f"{detail})") from None
        return torch.from_numpy(np.stack(arrays)).float() / 255

    def predict(self, requests):
        """A table of base64 images -> a table: a column per class (its probability) and
        `label` (the likeliest class), one row per image, the request's index kept."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        try:
            images = self.images(requests)
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        probabilities = self.probabilities(images)
        answer = pd.DataFrame(probabilities, columns=self.classes, index=requests.index)
        answer["label"] = [self.classes[i] for i in probabilities.argmax(1)]
        return answer


class RequestError(ValueError):
    """A request the model refuses (an HTTP 400 when served)."""


# logging

def signature(classes):
    """The answer's columns: a probability per class, then `label`. No input schema (an MLflow
    input schema drops unknown columns silently; predict checks its one column itself)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    outputs = Schema([ColSpec("double", c) for c in classes] + [ColSpec("string", "label")])
    return ModelSignature(inputs=None, outputs=outputs)


def log_classifier(probe_run_id, classifier, prior, register=None, summary=None):
    """Log `classifier` (a Classifier) to the probe run as the MLflow Model `classifier`: its
    prior's fine-tuned weights over the prior run's checkpoint (family, config, data), its head
    and class names, and the tokenizer run's checkpoint; `prior` is the LoadedPrior it was
    tuned from. Registers it as `register` (alias @champion) when given.
    Returns (model URI, registered version or None)."""
    import mlflow
    from mlflow.models import Model
    from core.errors import UserError
    from pipeline import tracking
    from pipeline.checkpoint import save_checkpoint
    from pipeline.runs import load_run_checkpoint
    from pipeline.served import PACKAGES, ROOT, _download_checkpoint, requirements
    if "label" in classifier.classes:
        raise UserError("a class is named 'label', the classifier's column for the likeliest "
                        "class; rename it in the CSV")
    original = load_run_checkpoint(prior.run_id, "prior", ("prior", "transformer"))
    tuned = {key: original[key] for key in ("family", "config", "data") if key in original}
    tuned.update(kind="prior", model={k: v.detach().cpu()
                                      for k, v in classifier.prior.state_dict().items()})
    linear = classifier.head.linear
    head = {"kind": KIND, "config": {"width": linear.in_features,
                                     "num_classes": linear.out_features},
            "model": {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()},
            "classes": classifier.classes}
    summary = summary or {}
    metadata = {"kind": KIND, "classes": classifier.classes, "input_column": INPUT_COLUMN,
                "probe_run_id": probe_run_id, "prior_run_id": prior.run_id,
                "tokenizer_run_id": prior.tokenizer_run_id, "prior": prior.family,
                "heldout_accuracy": summary.get("finetune_heldout_accuracy")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tuned, tmp / "prior.pt")
        save_checkpoint(head, tmp / "classifier.pt")
        tokenizer = _download_checkpoint(prior.tokenizer_run_id, tmp / "tokenizer")
        # created in the probe run's experiment: Model.log alone would put it in the
        # process's current experiment (Default), away from the run's Models tab
        model = tracking.client().create_logged_model(
            tracking.client().get_run(probe_run_id).info.experiment_id, MODEL_NAME,
            probe_run_id)
        with warnings.catch_warnings():  # MLflow's advice on type hints and input examples
            warnings.simplefilter("ignore", UserWarning)
            info = Model.log(None, mlflow.pyfunc, name=MODEL_NAME, run_id=probe_run_id,
                             model_id=model.model_id,
                             python_model=str(ROOT / "pipeline" / "classifier_model.py"),
                             artifacts={"prior": str(tmp / "prior.pt"),
                                        "classifier": str(tmp / "classifier.pt"),
                                        "tokenizer": str(tokenizer)},
                             code_paths=[str(ROOT / p) for p in PACKAGES if (ROOT / p).is_dir()],
                             pip_requirements=requirements(), signature=signature(
                                 classifier.classes),
                             registered_model_name=register, metadata=metadata)
    version = getattr(info, "registered_model_version", None)
    if register:
        client = tracking.client()
        client.set_registered_model_alias(register, "champion", str(version))
        accuracy = summary.get("finetune_heldout_accuracy")
        client.update_model_version(register, str(version), description=(
            f"Classifier fine-tuned by probe run {probe_run_id} from the {prior.family} prior "
            f"{prior.run_id}; held-out accuracy "
            f"{'n/a' if accuracy is None else f'{accuracy:.3f}'}. Request: a column "
            f"`{INPUT_COLUMN}`; answer: a probability column per class and `label`."))
    print(f"logged the classifier {info.model_uri}" + (
        f", registered as models:/{register}/{version} (alias @champion)" if register else ""),
        file=sys.stderr)
    return info.model_uri, version


# the command

def load_classifier(spec):
    """A pyfunc classifier from models:/NAME/VERSION, models:/NAME@alias, models:/<model id>,
    runs:/<run>/classifier or a probe run id; a UserError for anything else."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from core.errors import UserError
    from pipeline import tracking
    uri = spec
    if not spec.startswith(("models:/", "runs:/")):  # a probe run id: its newest classifier
        run = tracking.get_run(spec, "probe", flag="--model")
        logged = [m for m in tracking.client().search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{spec}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}])
            if m.name == MODEL_NAME]
        if not logged:
            raise UserError(f"--model {spec}: the probe run logged no classifier (probe with "
                            f"--finetune logs one)")
        uri = f"models:/{logged[0].model_id}"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise UserError(f"--model {spec}: cannot load the model from {tracking.tracking_uri()} "
                        f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
    kind = (model.metadata.metadata or {}).get("kind")
    if kind != KIND:
        raise UserError(f"--model {spec}: is not a classifier (logged by `probe --finetune`)")
    return model


def classify(model_spec, path_to_data, out="predictions.csv"):
    """Classify the images of a CSV with a logged classifier; write `out` (image_path, label
    where the CSV has one, predicted, a probability column per class). Returns (the
    predictions DataFrame, accuracy over the labelled rows or None)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from core.errors import UserError
    from pipeline.images import read_table
    table = read_table(path_to_data)  # the cheap checks first
    model = load_classifier(model_spec)
    answers = []
    for start in range(0, len(table.paths), REQUEST_ROWS):
        chunk = range(start, min(start + REQUEST_ROWS, len(table.paths)))
        request = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(table.paths[i].read_bytes())
                                               .decode() for i in chunk]},
                               index=[table.rows[i] + 1 for i in chunk])  # the CSV's row
        try:
            answers.append(model.predict(request))
        except MlflowException as e:
            raise UserError(f"{path_to_data} {e.message}")
    answer = pd.concat(answers)
    classes = [c for c in answer.columns if c != "label"]
    predictions = pd.DataFrame({"image_path": [str(p) for p in table.paths]})
    accuracy = None
    if table.labels is not None:
        given = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                 for v in table.labels]
        predictions["label"] = given
        labelled = [i for i, v in enumerate(given) if v is not None]
        if labelled:
            accuracy = float(np.mean([given[i] == answer["label"].iloc[i] for i in labelled]))
    predictions["predicted"] = answer["label"].to_numpy()
    for c in classes:
        predictions[c] = answer[c].to_numpy()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        predictions.to_csv(out, index=False)
        print(f"wrote {len(predictions)} predictions to {out}", file=sys.stderr)
    if accuracy is not None:
        unknown = sorted({v for v in predictions.get("label", []) if v is not None
                          and v not in classes})
        print(f"accuracy {accuracy:.4f} on {len(labelled)} labelled images" + (
            f" (labels the classifier does not know, always wrong: {', '.join(unknown)})"
            if unknown else ""), file=sys.stderr)
    return predictions, accuracy
