"""What a person reads about a run in the MLflow UI: its name, description, params and datasets.

- `run_name("vqvae", "f4", "K64", "16px")` -> "vqvae f4 K64 16px": the stage, then the settings
  that tell its runs apart (MLflow would otherwise name it e.g. "bemused-lark-325").
- `description(...)` -> the markdown shown under *Description* (tag `mlflow.note.content`): the
  command that made the run, its data, what each metric means with its unit, its artifacts.
- `run_params(...)` -> the settings as MLflow params, without the unset (None) ones; config.json
  keeps every setting.
- `csv_inputs(...)` / `codes_inputs(...)` / `npy_inputs(...)` -> MLflow datasets, one per split,
  with context `training` / `validation`, so the runs list's *Datasets* column and filter work.
  A dataset's digest is derived from the data's (a CSV's SHA-256, a folder's folder_sha256 in
  pipeline/images.py, or the codes') and the split's rows; its profile holds the full hashes,
  so lineage can be checked from the run alone.
"""

import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np

NOTE_TAG = "mlflow.note.content"  # the run's Description in the UI (markdown)
CONTEXT_TAG = "mlflow.data.context"  # "training" / "validation" on a dataset input


# names and commands

def run_name(stage, *settings):
    """'vqvae f4 K64 16px': the stage, then the given settings (None and '' skipped)."""
    return " ".join([stage, *(str(s) for s in settings if s not in (None, ""))])


def script_command(script, *flag_dicts):
    """The command line that runs `script` with these flags: `python train_vqvae.py --a 1`.
    Booleans become --flag / --no-flag (the scripts' BooleanOptionalAction); None is skipped."""
    words = ["python", script]
    for flags in flag_dicts:
        for name, value in flags.items():
            if value is None:
                continue
            if isinstance(value, bool):
                words.append(f"--{name}" if value else f"--no-{name}")
            else:
                words += [f"--{name}", str(value)]
    return shlex.join(words)


def process_command(argv=None):
    """This process's command line as typed: `python train.py ...`, `python -m pipeline demo`."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    program = Path(argv[0])
    if program.name == "__main__.py":  # python -m package
        words = ["python", "-m", program.parent.name]
    elif program.suffix == ".py":
        words = ["python", _relative(program)]
    else:
        words = [program.name]  # e.g. pytest, torchrun's child sees the script
    return shlex.join(words + argv[1:])


def source_tags(tags=None):
    """`tags` plus what MLflow's own start_run records: the user, the source (shown in the runs
    list's Source column: the script, or `python -m pipeline`), and the git commit."""
    from mlflow.tracking.context.registry import resolve_tags
    resolved = resolve_tags(tags or {})
    source = Path(resolved.get("mlflow.source.name", ""))
    if source.name == "__main__.py":  # python -m package
        resolved["mlflow.source.name"] = f"python -m {source.parent.name}"
    return resolved


def _wrap(command, width=88):
    """A long shell command as lines of at most ~width characters, continued with `\\`,
    breaking only between a flag's value and the next flag."""
    lines, line = [], ""
    for word in shlex.split(command):
        word = shlex.quote(word)
        if line and word.startswith("--") and len(line) + 1 + len(word) > width - 12:
            lines.append(line + " \\")
            line = "   " + word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]


def _relative(path):
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# params

def run_params(*layers):
    """One flat dict of params from dicts (later ones win), without the None values."""
    merged = {}
    for layer in layers:
        merged.update(layer)
    return {k: v for k, v in merged.items() if v is not None}


# the description

def description(title, command, started_by=None, data=None, metrics=None, artifacts=None,
                notes=()):
    """Markdown for a run's description.

    title: one line saying what the run is. command: the command that reproduces it.
    started_by: the process command when it differs (e.g. `python -m pipeline demo`).
    data: a line on the data. metrics / artifacts: {name: meaning, with its unit}.
    notes: further lines (e.g. how to resume)."""
    lines = [f"**{title}**", "", "Command:", "", *("    " + line for line in _wrap(command))]
    if started_by and started_by != command:
        lines += ["", f"started by `{started_by}`"]
    if data:
        lines += ["", f"Data: {data}"]
    if metrics:
        lines += ["", "| metric | meaning |", "|---|---|"]
        lines += [f"| `{name}` | {meaning} |" for name, meaning in metrics.items()]
    if artifacts:
        lines += ["", "Artifacts:", ""]
        lines += [f"- `{name}`: {meaning}" for name, meaning in artifacts.items()]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


# datasets

def csv_inputs(csv_path, csv_sha256, splits, columns=("image_path",)):
    """MLflow dataset inputs for the rows of an image CSV, or the images of a folder, used by
    each split; the source names the CSV or the folder, csv_sha256 is the data's digest
    (images.Source.sha256).

    splits: {"training": row indices, "validation": row indices} (0-based data rows)."""
    csv_path = Path(csv_path).resolve()
    name = f"{csv_path.parent.name}/{csv_path.name}"
    schema = _schema({column: "string" if column == "image_path" else "long"
                      for column in columns})
    return [_dataset_input(name, "local", {"uri": str(csv_path)}, csv_sha256, context, rows,
                           schema, {"csv_sha256": csv_sha256})
            for context, rows in splits.items()]


def codes_inputs(tokenizer_run_id, codes_name, codes_meta, codes, splits):
    """MLflow dataset inputs for the code grids a prior trains on, one per split.

    The source names the tokenizer run's artifact (`runs:/<id>/codes/<name>.npy`); the digest
    comes from the codes' contents and the split's rows, and the profile carries the image CSV's
    SHA-256 from `codes_meta` (the codes/<name>.json), so a prior run shows which images its
    codes came from. codes: the (N, h, w) integer array or tensor as loaded."""
    codes_sha256, schema = _codes_hash_and_schema(codes)
    uri = f"runs:/{tokenizer_run_id}/codes/{codes_name}.npy"
    lineage = {"codes_sha256": codes_sha256, "tokenizer_run_id": tokenizer_run_id,
               "csv_sha256": codes_meta.get("csv_sha256"),
               "codebook_size": codes_meta.get("codebook_size")}
    return [_dataset_input(f"codes/{codes_name}.npy", "mlflow_run_artifact", {"uri": uri},
                           codes_sha256, context, rows, schema, lineage)
            for context, rows in splits.items()]


def npy_inputs(path, codes, splits):
    """MLflow dataset inputs for code grids read from a local .npy file (train.py
    --path_to_data), one per split; the digest comes from the codes' contents."""
    path = Path(path).resolve()
    codes_sha256, schema = _codes_hash_and_schema(codes)
    return [_dataset_input(f"{path.parent.name}/{path.name}", "local", {"uri": str(path)},
                           codes_sha256, context, rows, schema, {"codes_sha256": codes_sha256})
            for context, rows in splits.items()]


def log_inputs(run_id, inputs):
    """Attach dataset inputs (from csv_inputs / codes_inputs) to a run."""
    from pipeline import tracking
    if inputs:
        tracking.client().log_inputs(run_id, datasets=list(inputs))


def _codes_hash_and_schema(codes):
    """SHA-256 of an (N, h, w) integer array or tensor (as int64, with its shape), and its schema."""
    codes = np.ascontiguousarray(np.asarray(codes, dtype=np.int64))
    digest = hashlib.sha256(repr(codes.shape).encode() + codes.tobytes()).hexdigest()
    return digest, _tensor_schema("int64", [-1, *codes.shape[1:]])


def _dataset_input(name, source_type, source, content_sha256, context, rows, schema, lineage):
    from mlflow.entities import Dataset, DatasetInput, InputTag
    rows = np.asarray(rows, dtype=np.int64)
    # the split's own digest: the same file split differently is a different dataset
    digest = hashlib.sha256(content_sha256.encode() + rows.tobytes()).hexdigest()[:8]
    profile = {"num_rows": int(len(rows)), "split": context, **lineage}
    dataset = Dataset(name=name, digest=digest, source_type=source_type,
                      source=json.dumps(source), schema=schema, profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT_TAG, value=context)])


def _tensor_schema(dtype, shape):
    """MLflow's tensor schema (as numpy datasets write it) for arrays of this dtype and shape."""
    spec = [{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": list(shape)}}]
    return json.dumps({"mlflow_tensorspec": {"features": json.dumps(spec), "targets": None}})


def _schema(columns):
    """MLflow's column-spec schema (as pandas datasets write it) for {column: type}."""
    return json.dumps({"mlflow_colspec": [{"type": kind, "name": name, "required": True}
                                          for name, kind in columns.items()]})
