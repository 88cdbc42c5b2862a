"""A prior and its tokenizer as one MLflow Model that serves images.

`log_generator(prior_run_id)` logs an MLflow Model (pyfunc, models-from-code:
pipeline/served_model.py) holding the prior's and the tokenizer's checkpoints, this toolkit's
code, an output signature and the prior's lineage; `--register NAME` adds it to the Model Registry.
`mlflow models serve -m models:/NAME@alias --env-manager local` then answers /invocations.

A request is a table, one row per request (request_columns):
    num_samples (1..MAX_SAMPLES, default 1), label (conditional priors), the prior family's
    sampling settings (priors/settings.py: temperature (>= 0, default 1), top_k, top_p,
    guidance; the absorbing prior's steps, sampler, ...), seed (default 0)
and the answer one row per image: request (its row), sample, label, seed,
image_png_base64 (a PNG, base64) and codes_json (the token grid as JSON). Each request row
draws with its own generator seeded by `seed`, so the same request gives the same images,
whatever else is in the batch. A bad request raises a 400-style error naming the problem.

The signature describes the answer only. With an input schema MLflow drops request columns it
does not know, silently: a misspelt `lable` would give unconditional images. Without one the
columns reach `_check`, which refuses unknown ones and checks every value itself.
"""

import base64
import dataclasses
import io
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the code the logged model ships (code_paths): every package the prior, the tokenizer and
# the request checks import
PACKAGES = ("core", "pipeline", "priors", "transformer", "pixelcnn", "vqvae", "pixels",
            "image_tokenizers")
MAX_SAMPLES = 64          # images per request row
MAX_TOTAL_SAMPLES = 256   # images per call (all rows)
MODEL_NAME = "generator"  # the logged model's name within the run
# a request column's kind, from its sampling field's type
KINDS = {int: "whole number", float: "number", str: "string", bool: "boolean"}
MAX_SEED = 2 ** 63 - 1  # the answer's seed column is a signed 64-bit integer
EXACT_FLOAT = 2 ** 53   # whole numbers a float holds exactly (a column with gaps is float)
RESPONSE_COLUMNS = {"request": "long", "sample": "long", "label": "string", "seed": "long",
                    "image_png_base64": "string", "codes_json": "string"}


def request_columns(family):
    """{column: kind} of a request to a served prior of `family`: num_samples, label, the
    family's sampling settings (priors.sampling_class; their kinds from the field types), seed."""
    import priors
    from core.config import field_type
    from priors.settings import LARGER_IMAGES  # not served: a request could ask for any size
    sampling = {f.name: KINDS[field_type(f)]
                for f in dataclasses.fields(priors.sampling_class(family))
                if f.name not in LARGER_IMAGES}
    return {"num_samples": "whole number", "label": "string", **sampling, "seed": "whole number"}


class RequestError(ValueError):
    """A request the model refuses; the pyfunc wrapper turns it into an HTTP 400."""


def _value(row, key, kind, default=None, where=""):
    """One field of a request row: `default` when absent (a gap in a table is NaN), a label as
    a string, a value checked for its kind (request_columns)."""
    value = row.get(key)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a numpy scalar (pandas, a Python caller's arrays)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    if key == "label":  # a column of labels with gaps holds floats: 3.0 is label '3'
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if kind in ("string", "boolean"):
        if not isinstance(value, str if kind == "string" else bool):
            raise RequestError(f"{where}: {key} must be a {kind}, got {value!r}")
        return value
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{where}: {key} must be a {kind}, got {value!r}")
    if kind == "whole number":
        if value != int(value):
            raise RequestError(f"{where}: {key} must be a whole number, got {value!r}")
        if isinstance(value, float) and abs(value) > EXACT_FLOAT:
            raise RequestError(f"{where}: {key} {value!r} is past what a float holds exactly "
                               f"(a column with gaps is sent as floats); give it in every row")
        return int(value)
    return float(value)


def _rows(requests):
    """The request rows as dicts, from a DataFrame (`dataframe_records`, `dataframe_split`) or a
    list of dicts; MLflow hands other formats (`inputs`, `instances`) over as dicts of
    columns, which are read as a table when they are one."""
    import pandas as pd
    if isinstance(requests, dict):
        try:
            requests = pd.DataFrame({k: [v] if getattr(v, "ndim", 1) == 0 or isinstance(
                v, (str, int, float)) else list(v) for k, v in requests.items()})
        except (TypeError, ValueError) as e:
            raise RequestError(f"could not read the request as a table ({e}); send "
                               f"dataframe_records or dataframe_split") from None
    if hasattr(requests, "to_dict"):
        return requests.to_dict("records")
    rows = list(requests)
    if not all(isinstance(row, dict) for row in rows):
        raise RequestError("each request must be a row of named fields; send dataframe_records "
                           "or dataframe_split")
    return rows


class ServedGenerator:
    """The prior (averaged weights when it kept them) and its tokenizer, on the CPU or GPU."""

    def __init__(self, model, tokenizer, classes):
        self.model, self.tokenizer, self.classes = model, tokenizer, classes
        self.columns = request_columns(model.family)

    @classmethod
    def load(cls, prior_path, tokenizer_path, device=None):
        import priors
        from pipeline.checkpoint import load_checkpoint
        from pipeline.device import pick_device
        from pipeline.tokenizers import tokenizer_from_checkpoint
        device = pick_device(device)
        checkpoint = load_checkpoint(prior_path, ("prior", "transformer"))
        model = priors.from_checkpoint(checkpoint).to(device)
        tokenizer = tokenizer_from_checkpoint(load_checkpoint(tokenizer_path), device)
        data = checkpoint.get("data") or {}
        return cls(model, tokenizer, data.get("classes"))

    def predict(self, requests):
        """requests: a pandas DataFrame (or list of dicts) -> DataFrame of images."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from core.errors import UserError
        try:
            rows = _rows(requests)
            if not rows or not any(rows):
                raise RequestError(f"no requests: send rows with any of the fields "
                                   f"{', '.join(self.columns)}")
            settings = [self._check(i, row) for i, row in enumerate(rows)]
            total = sum(s["num_samples"] for s in settings)
            if total > MAX_TOTAL_SAMPLES:
                raise RequestError(f"{total} images requested in one call; at most "
                                   f"{MAX_TOTAL_SAMPLES}")
            answers = []
            for i, s in enumerate(settings):
                answers.extend(self._answer(i, s))
        except (RequestError, UserError) as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return pd.DataFrame(answers, columns=list(RESPONSE_COLUMNS))

    def _check(self, i, row):
        import priors
        where, columns = f"request {i}", self.columns
        unknown = set(row) - set(columns)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(columns)}")
        n = _value(row, "num_samples", columns["num_samples"], 1, where)
        if not 1 <= n <= MAX_SAMPLES:
            raise RequestError(f"{where}: num_samples must be in 1..{MAX_SAMPLES}, got {n}")
        # the columns between label and seed are the family's sampling settings
        settings = {key: _value(row, key, kind, None, where) for key, kind in columns.items()
                    if key not in ("num_samples", "label", "seed")}
        sampling = priors.sampling_settings(self.model.family, settings, where=f"{where}: {{}}")
        seed = _value(row, "seed", columns["seed"], 0, where)
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"{where}: seed must be in 0..{MAX_SEED}, got {seed}")
        label = _value(row, "label", columns["label"])
        label_id = None
        if label is not None:
            if not self.classes:
                raise RequestError(f"{where}: this model was trained without labels")
            if label not in self.classes:
                raise RequestError(f"{where}: unknown label '{label}'; known labels: "
                                   f"{', '.join(self.classes)}")
            label_id = self.classes.index(label)
        return {"num_samples": n, "label": label, "label_id": label_id, "sampling": sampling,
                "seed": seed}

    @torch.no_grad()
    def _answer(self, i, s):
        from pipeline.visual import to_uint8
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(s["seed"])
        labels = (torch.full((s["num_samples"],), s["label_id"], dtype=torch.long, device=device)
                  if s["label_id"] is not None else None)
        codes = self.model.sample(s["num_samples"], labels, generator=generator,
                                  **dataclasses.asdict(s["sampling"])).cpu()
        images = to_uint8(self.tokenizer.decode(codes))
        answers = []
        for k, array in enumerate(images):
            from PIL import Image
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            answers.append({"request": i, "sample": k, "label": s["label"], "seed": s["seed"],
                            "image_png_base64": base64.b64encode(buffer.getvalue()).decode(),
                            "codes_json": json.dumps(codes[k].tolist())})
        return answers


def signature():
    """The answer's columns; no input schema (see the module doc): the request's columns are
    in the model's metadata, `request_columns`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    outputs = Schema([ColSpec(kind, name) for name, kind in RESPONSE_COLUMNS.items()])
    return ModelSignature(inputs=None, outputs=outputs)


def requirements():
    """The pinned requirements of this toolkit (requirements.txt without the test runner)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines
            if line.strip() and not line.startswith("#") and not line.startswith("pytest")]


def log_generator(prior_run_id, register=None):
    """Log the MLflow Model of a finished prior run (its best checkpoint and its tokenizer's);
    register it as `register` when given. Returns (model URI, registered version or None)."""
    import mlflow
    from mlflow.models import Model
    from pipeline import tracking
    from core.errors import UserError
    run = tracking.get_run(prior_run_id, "prior")
    tokenizer_run_id = tracking.tokenizer_run_of(run)
    if not tokenizer_run_id:
        raise UserError(f"run {prior_run_id}: a prior trained from a local file has no "
                        f"tokenizer to serve images with; no model logged")
    with tempfile.TemporaryDirectory() as tmp:
        prior = _download_checkpoint(prior_run_id, Path(tmp) / "prior")
        tokenizer = _download_checkpoint(tokenizer_run_id, Path(tmp) / "tokenizer")
        with warnings.catch_warnings():  # MLflow's advice on type hints and input examples
            warnings.simplefilter("ignore", UserWarning)
            info = Model.log(None, mlflow.pyfunc, name=MODEL_NAME, run_id=prior_run_id,
                             python_model=str(ROOT / "pipeline" / "served_model.py"),
                             artifacts={"prior": str(prior), "tokenizer": str(tokenizer)},
                             code_paths=[str(ROOT / p) for p in PACKAGES if (ROOT / p).is_dir()],
                             pip_requirements=requirements(), signature=signature(),
                             registered_model_name=register,
                             metadata={"request_columns": request_columns(family_of(run)),
                                       "prior_run_id": prior_run_id,
                                       "tokenizer_run_id": tokenizer_run_id,
                                       "prior": family_of(run)})
    version = getattr(info, "registered_model_version", None)
    print(f"logged model {info.model_uri}" + (f", registered as models:/{register}/{version}"
                                              if register else ""), file=sys.stderr)
    return info.model_uri, version


def family_of(run):
    """The prior family of a prior run (runs from before the families were all GPTs)."""
    from pipeline import tracking
    return tracking.stage_of(run)[1] or "gpt"


def _download_checkpoint(run_id, folder):
    from pipeline import tracking
    from core.errors import UserError
    folder.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        try:
            return tracking.download_artifact(run_id, f"checkpoints/{name}", folder)
        except UserError:
            continue
    raise UserError(f"run {run_id}: has no checkpoint to put in the model")


def register_prior(prior_run_id, name, alias="champion"):
    """Register the newest model a prior run logged (logging one first if it has none) as a
    new version of `name`, and point `alias` at it. Returns the version number."""
    import mlflow
    from pipeline import tracking
    client = tracking.client()
    run = tracking.get_run(prior_run_id, "prior")
    logged = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{prior_run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    if logged:
        version = mlflow.register_model(f"models:/{logged[0].model_id}", name).version
    else:
        version = log_generator(prior_run_id, name)[1]
    client.set_registered_model_alias(name, alias, str(version))
    describe_version(client, name, version, run)
    print(f"registered models:/{name}/{version} (alias @{alias})", file=sys.stderr)
    return version


def describe_version(client, name, version, run):
    """What the registry page shows: how to call the model (once, on the registered model) and,
    on the version, which run it came from and its validation figures."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=(
            "Images from a prior over a tokenizer's codes (this toolkit's `generator` pyfunc). "
            "Serve: `mlflow models serve -m models:/" + name + "@champion --env-manager local`. "
            "Request rows: " + ", ".join(f"{k} ({v})" for k, v in
                                         request_columns(family_of(run)).items())
            + "; answer rows: " + ", ".join(RESPONSE_COLUMNS) + "."))
    figures = ", ".join(f"{k} {v:.3f}" for k, v in sorted(run.data.metrics.items())
                        if k.startswith("val/"))
    client.update_model_version(name, str(version), description=(
        f"Run '{run.info.run_name}' ({run.info.run_id}); {figures or 'no validation figures'}."))
