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

Bounds, so that a server stays up under overload (docs/serving.md):
    work per call   at most MAX_TOTAL_SAMPLES images and PIPELINE_SERVING_MAX_TOKENS tokens to
                    draw (images x the grid's tokens), counted from the num_samples column
                    before any row is read; more is a 400
    calls at once   PIPELINE_SERVING_MAX_INFLIGHT per server process; one more is refused at
                    once with a 429 (retry later), so it never queues behind the others
    time            under `mlflow models serve` (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT set),
                    sampling stops between steps at DEADLINE_SHARE of that timeout and the call
                    gets a 504: no thread keeps computing for an answer nobody waits for
Rows with the same sampling settings are drawn in one batch, each from its own seed
(priors.sampling.RowGenerators), so batching does not change what a row gets. An error of ours
is a 500 with a short message, its traceback in the server's log, never in the answer.

The signature describes the answer only. With an input schema MLflow drops request columns it
does not know, silently: a misspelt `lable` would give unconditional images. Without one the
columns reach `_check`, which refuses unknown ones and checks every value itself.
"""

import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the code the logged model ships (code_paths): every package the prior, the tokenizer and
# the request checks import
PACKAGES = ("core", "pipeline", "priors", "transformer", "pixelcnn", "vqvae", "pixels",
            "image_tokenizers")
MAX_SAMPLES = 64          # images per request row
MAX_TOTAL_SAMPLES = 256   # images per call (all rows): bounds the answer's size
# Defaults of the bounds a server's environment may change (Limits.from_env)
MAX_TOKENS = 256 * 16 * 16  # tokens drawn per call: 256 images of a 16x16 grid
MAX_INFLIGHT = 2            # calls computing at once per server process
DEADLINE_SHARE = 0.8        # of MLflow's request timeout, for sampling; the rest decodes
MODEL_NAME = "generator"  # the logged model's name within the run
# a request column's kind, from its sampling field's type
KINDS = {int: "whole number", float: "number", str: "string", bool: "boolean"}
MAX_SEED = 2 ** 63 - 1  # the answer's seed column is a signed 64-bit integer
EXACT_FLOAT = 2 ** 53   # whole numbers a float holds exactly (a column with gaps is float)
RESPONSE_COLUMNS = {"request": "long", "sample": "long", "label": "string", "seed": "long",
                    "image_png_base64": "string", "codes_json": "string"}
# The logged model's input example: the smallest request (one image; a conditional prior
# draws it unconditionally, a label being optional)
EXAMPLE_REQUEST = {"num_samples": 1, "seed": 0}
# The logged model's tags, named as the prior run's (pipeline/tracking.py), so that the Models
# tab filters generators by family or tokenizer
MODEL_TAGS = {"family": "pipeline.prior", "tokenizer": "pipeline.tokenizer",
              "tokenizer_run_id": "pipeline.tokenizer_run_id"}


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


class OutOfTime(Exception):
    """The call's time ran out while its images were drawn (an HTTP 504)."""


class Busy(Exception):
    """Every slot for a call is taken (an HTTP 429)."""


@dataclasses.dataclass
class Limits:
    """What one server process takes on (the module docstring's bounds)."""
    max_tokens: int = MAX_TOKENS
    max_inflight: int = MAX_INFLIGHT
    timeout_s: float = None  # MLflow's request timeout; None: no deadline (a Python caller)

    @classmethod
    def from_env(cls, environ=None):
        from core.errors import UserError
        environ = os.environ if environ is None else environ
        values = {}
        for key, name in (("max_tokens", "PIPELINE_SERVING_MAX_TOKENS"),
                          ("max_inflight", "PIPELINE_SERVING_MAX_INFLIGHT"),
                          ("timeout_s", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")):
            if environ.get(name, "").strip():
                try:
                    values[key] = int(environ[name])
                except ValueError:
                    values[key] = 0
                if values[key] < 1:
                    raise UserError(f"{name} must be a whole number >= 1, got "
                                    f"'{environ[name]}'")
        return cls(**values)


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


def _table(requests):
    """The request as a DataFrame (`dataframe_records`, `dataframe_split`) or a list of dicts;
    MLflow hands other formats (`inputs`, `instances`) over as dicts of columns, which are read
    as a table when they are one."""
    import pandas as pd
    if isinstance(requests, dict):
        try:
            requests = pd.DataFrame({k: [v] if getattr(v, "ndim", 1) == 0 or isinstance(
                v, (str, int, float)) else list(v) for k, v in requests.items()})
        except (TypeError, ValueError) as e:
            raise RequestError(f"could not read the request as a table ({e}); send "
                               f"dataframe_records or dataframe_split") from None
    if hasattr(requests, "to_dict"):
        return requests
    rows = list(requests)
    if not all(isinstance(row, dict) for row in rows):
        raise RequestError("each request must be a row of named fields; send dataframe_records "
                           "or dataframe_split")
    return rows


def _images_asked(table):
    """The images a table asks for, from its num_samples column alone (no row is checked yet):
    a row counts its num_samples clipped to 1..MAX_SAMPLES, or 1 when it is not a number (the
    row's own check refuses both later, naming the row)."""
    if hasattr(table, "columns"):
        values = table["num_samples"].tolist() if "num_samples" in table.columns else \
            [None] * len(table)
    else:
        values = [row.get("num_samples") for row in table]
    total = 0
    for value in values:
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        number = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
        total += min(max(int(value), 1), MAX_SAMPLES) if number else 1
    return total


class ServedGenerator:
    """The prior (averaged weights when it kept them) and its tokenizer, on the CPU or GPU."""

    def __init__(self, model, tokenizer, classes, limits=None):
        self.model, self.tokenizer, self.classes = model, tokenizer, classes
        self.columns = request_columns(model.family)
        self.limits = limits or Limits.from_env()
        self.slots = threading.BoundedSemaphore(self.limits.max_inflight)
        self.in_flight = 0  # calls holding a slot (read by tests and benchmarks)
        self._count_lock = threading.Lock()

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
        """requests: a pandas DataFrame (or list of dicts) -> DataFrame of images. Errors are
        MlflowExceptions whose code MLflow's server turns into the HTTP status: 400 a bad
        request, 429 busy, 504 out of time, 503 out of memory, 500 an error of ours."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos import databricks_pb2 as status
        from core.errors import UserError
        started = time.monotonic()
        limits = self.limits
        deadline = None if limits.timeout_s is None else \
            started + DEADLINE_SHARE * limits.timeout_s
        try:
            table = self._bounded(requests)  # before a slot: too big is a 400 even when busy
            with self._slot():
                answers = self._predict(table, deadline)
        except Busy:
            raise MlflowException(f"busy: {limits.max_inflight} calls are being answered "
                                  f"(PIPELINE_SERVING_MAX_INFLIGHT); retry in a moment",
                                  error_code=status.REQUEST_LIMIT_EXCEEDED) from None
        except (RequestError, UserError) as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        except OutOfTime:
            raise MlflowException(
                f"out of time: the images were not drawn within {DEADLINE_SHARE:.0%} of the "
                f"{limits.timeout_s} s request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); "
                f"ask for fewer images", error_code=status.DEADLINE_EXCEEDED) from None
        except (MemoryError, torch.OutOfMemoryError):
            raise MlflowException("out of memory while drawing the images; retry with fewer "
                                  "images or later", error_code=status.TEMPORARILY_UNAVAILABLE) \
                from None
        except Exception as e:  # ours: the traceback goes to the server's log, not the client
            print(f"pipeline.served: internal error answering a call:\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            raise MlflowException(f"internal error ({type(e).__name__}); the server's log has "
                                  f"the details", error_code=status.INTERNAL_ERROR) from None
        return pd.DataFrame(answers, columns=list(RESPONSE_COLUMNS))

    @contextlib.contextmanager
    def _slot(self):
        """One of the max_inflight slots for the call, or Busy at once: a call beyond the bound
        must not queue behind the ones computing (nor hold one of MLflow's threads)."""
        if not self.slots.acquire(blocking=False):
            raise Busy()
        with self._count_lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.in_flight -= 1
            self.slots.release()

    def _bounded(self, requests):
        """The request's table, once its size is within the bounds, counted from the
        num_samples column before any row is read."""
        table = _table(requests)
        images = _images_asked(table)
        if images > MAX_TOTAL_SAMPLES:
            raise RequestError(f"{images} images requested in one call; at most "
                               f"{MAX_TOTAL_SAMPLES}")
        tokens = self.model.config.grid_h * self.model.config.grid_w
        if images * tokens > self.limits.max_tokens:
            raise RequestError(f"{images} images of {tokens} tokens = {images * tokens} tokens "
                               f"to draw in one call; at most {self.limits.max_tokens} "
                               f"(PIPELINE_SERVING_MAX_TOKENS): ask for fewer images per call")
        return table

    def _predict(self, table, deadline):
        rows = table.to_dict("records") if hasattr(table, "to_dict") else table
        if not rows or not any(rows):
            raise RequestError(f"no requests: send rows with any of the fields "
                               f"{', '.join(self.columns)}")
        settings = [self._check(i, row) for i, row in enumerate(rows)]

        def check_time(*_):  # sampling's on_step, and between rows
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime()

        # rows drawn together: the same sampling settings, and all labelled or none
        groups = {}
        for i, s in enumerate(settings):
            key = (tuple(dataclasses.asdict(s["sampling"]).items()), s["label_id"] is None)
            groups.setdefault(key, []).append(i)
        codes = {}
        for members in groups.values():
            drawn = self._sample([settings[i] for i in members],
                                 check_time if deadline is not None else None)
            codes.update(zip(members, drawn))
        answers = []
        for i, s in enumerate(settings):
            check_time()
            answers.extend(self._answer(i, s, codes[i]))
        return answers

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
    def _sample(self, rows, on_step=None):
        """Token grids (num_samples, h, w) for each of `rows` (checked requests with the same
        sampling settings), drawn in one batch; each row from its own generator seeded by its
        seed, so it gets what it would get alone."""
        from priors.sampling import RowGenerators
        device = next(self.model.parameters()).device
        sizes = [s["num_samples"] for s in rows]
        generators = [torch.Generator(device=device).manual_seed(s["seed"]) for s in rows]
        labels = None
        if rows[0]["label_id"] is not None:
            labels = torch.cat([torch.full((s["num_samples"],), s["label_id"], dtype=torch.long,
                                           device=device) for s in rows])
        generator = generators[0] if len(rows) == 1 else RowGenerators(generators, sizes)
        extra = {} if on_step is None else {"on_step": on_step}
        codes = self.model.sample(sum(sizes), labels, generator=generator, **extra,
                                  **dataclasses.asdict(rows[0]["sampling"])).cpu()
        return codes.split(sizes)

    @torch.no_grad()
    def _answer(self, i, s, codes):
        """The answer rows of request i: its images decoded by themselves (a decoder's output
        may differ in the last bit with the batch it is in), as PNGs."""
        from PIL import Image
        from pipeline.visual import to_uint8
        images = to_uint8(self.tokenizer.decode(codes))
        answers = []
        for k, array in enumerate(images):
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
    register it as `register` when given. Returns (model URI, registered version or None).

    The logged model is what the experiment's Models tab lists and ranks: it is logged at its
    checkpoint's step, so MLflow links the run's metrics of that step to it, and the validation
    figures are linked again naming the validation split (_link_validation); the one command
    adds the quality figures (pipeline/ranking.py). It is tagged with its family and tokenizer
    (MODEL_TAGS), and carries an input example (EXAMPLE_REQUEST) that MLflow checks by
    answering it once, one image, while it logs."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model
    from pipeline import describe, tracking
    from pipeline.checkpoint import load_checkpoint
    from core.errors import UserError
    run = tracking.get_run(prior_run_id, "prior")
    tokenizer_run_id = tracking.tokenizer_run_of(run)
    if not tokenizer_run_id:
        raise UserError(f"run {prior_run_id}: a prior trained from a local file has no "
                        f"tokenizer to serve images with; no model logged")
    tokenizer_kind = tracking.stage_of(tracking.get_run(tokenizer_run_id))[1]
    with tempfile.TemporaryDirectory() as tmp:
        prior = _download_checkpoint(prior_run_id, Path(tmp) / "prior")
        tokenizer = _download_checkpoint(tokenizer_run_id, Path(tmp) / "tokenizer")
        step = load_checkpoint(prior, ("prior", "transformer"))["step"]
        tags = {MODEL_TAGS["family"]: family_of(run), MODEL_TAGS["tokenizer"]: tokenizer_kind,
                MODEL_TAGS["tokenizer_run_id"]: tokenizer_run_id}
        # created here, in the run's experiment: Model.log would create it in the process's
        # current experiment (Default), away from the run and its experiment's Models tab
        model = tracking.client().create_logged_model(
            run.info.experiment_id, MODEL_NAME, prior_run_id, describe.source_tags(tags),
            run.data.params)
        with warnings.catch_warnings():  # MLflow's advice on type hints
            warnings.simplefilter("ignore", UserWarning)
            info = Model.log(None, mlflow.pyfunc, name=MODEL_NAME, run_id=prior_run_id,
                             model_id=model.model_id, step=step, tags=tags,
                             python_model=str(ROOT / "pipeline" / "served_model.py"),
                             artifacts={"prior": str(prior), "tokenizer": str(tokenizer)},
                             code_paths=[str(ROOT / p) for p in PACKAGES if (ROOT / p).is_dir()],
                             pip_requirements=requirements(), signature=signature(),
                             input_example=pd.DataFrame([EXAMPLE_REQUEST]),
                             registered_model_name=register,
                             metadata={"request_columns": request_columns(family_of(run)),
                                       "prior_run_id": prior_run_id,
                                       "tokenizer_run_id": tokenizer_run_id,
                                       "prior": family_of(run)})
    _link_validation(run, info.model_id, step)
    version = getattr(info, "registered_model_version", None)
    print(f"logged model {info.model_uri} at step {step}" + (
        f", registered as models:/{register}/{version}" if register else ""), file=sys.stderr)
    return info.model_uri, version


def _link_validation(run, model_id, step):
    """Link the validation figures of `step` to the logged model again, naming the validation
    split they were measured on. (Model.log links the run's metrics of its step, but MLflow's
    SQL store keeps a metric's dataset only with a model's metrics, so those links name none.)"""
    from pipeline import describe, ranking, tracking
    validation = [i.dataset for i in run.inputs.dataset_inputs
                  if any(t.key == describe.CONTEXT_TAG and t.value == "validation" for t in i.tags)]
    figures = {m.key: m.value for key in run.data.metrics if key.startswith("val/")
               for m in tracking.client().get_metric_history(run.info.run_id, key)
               if m.step == step}
    if validation and figures:
        ranking.link_figures(run.info.run_id, figures, validation[0], model_id, step)


def family_of(run):
    """The prior family of a prior run (runs from before the families were all GPTs)."""
    from pipeline import tracking
    return tracking.stage_of(run)[1] or "gpt"


def _download_checkpoint(run_id, folder):
    """best.pt (last.pt if it is unreadable), verified, and no older than the local copy."""
    from pipeline.runs import checkpoint_for_model
    folder.mkdir(parents=True)
    return checkpoint_for_model(run_id, folder)


def register_prior(prior_run_id, name, heldout=None):
    """Register the newest model a prior run logged (logging one first if it has none) as a
    new version of `name`, and give it @champion or @challenger by pipeline/ranking.py's rule:
    heldout (a ranking.HeldOut: what the one command's quality step judged it on, and its FD
    ratio there), or None without a quality step, when the first version alone takes
    @champion. Prints one line naming the alias and why. Returns (version, alias)."""
    import mlflow
    from pipeline import ranking, tracking
    client = tracking.client()
    run = tracking.get_run(prior_run_id, "prior")
    model_id = ranking.logged_model_id(prior_run_id)
    if not model_id:
        model_id = log_generator(prior_run_id)[0][len("models:/"):]
    # the alias is decided before the version exists: a failure here leaves no version
    # without an alias
    alias, why, champion = ranking.place(name, model_id, heldout)
    version = mlflow.register_model(f"models:/{model_id}", name).version
    client.set_registered_model_alias(name, alias, str(version))
    describe_version(client, name, version, run)
    against = f" (against @champion, version {champion})" if champion else ""
    where = f" on {heldout.dataset_input.dataset.name} #{heldout.digest}" if heldout else ""
    print(f"registered models:/{name}/{version} as @{alias}{against}: {why}{where}",
          file=sys.stderr)
    return version, alias


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
