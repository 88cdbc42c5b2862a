"""Which generator is better: a prior's quality figures against held-out images, and the rule
that moves `@champion` in the Model Registry.

The rule (`decide`): a new version takes `@champion` only when its FD ratio (FIGURE) on the
held-out data is lower than the champion's judged by the *same* reference: the same held-out
data (MLflow dataset digest) and the same training images, labels and feature space (the
QualityReference's fingerprint, tag REFERENCE_TAG on the run that linked the figure), which
the FD ratio's denominator and features depend on; otherwise it becomes `@challenger`. Why the FD ratio: it is the one figure that
sums up both realism and variety (precision and recall each see one side), lower is better, and
it divides the samples' Fréchet distance to the held-out images by that of real training images
to the same held-out images, so it keeps its meaning when two versions' tokenizers saw other
training rows; it is the figure the presets were compared by (pipeline/run.py). Why the same
reference: a figure on other held-out images, or judged in another feature space, measures
another thing.
A tie does not move it: the champion keeps its alias unless it is beaten.

The cases (`place`): no @champion yet, the new version takes it; the same logged model as the
champion (a reused prior registered again), it takes it too, nothing changes but the version;
no quality step (`train.py --register`), nothing to compare, so @challenger; a champion whose
images cannot be judged on these held-out images (another size or channels: other data), or
that cannot be judged at all (its run or checkpoints gone), @challenger, with a warning. The
alias is decided before the version is registered, so a failure leaves no version without one.

The figures a model is compared by are the metrics linked to its logged model (MLflow 3 keeps
them with their dataset's name and digest): the one command links its quality figures there
(`link_figures`), as does `python -m pipeline quality`. A champion without a figure judged by
this reference is judged on the spot (`HeldOut.judge`: its own sampling settings, this run's
number of samples and draws, the very same reference), and the figure is kept in an evaluation
run linked to its model, so the next comparison finds it.
"""

import dataclasses
import sys

import priors
from core.config import field_type
from pipeline import describe, tracking
from pipeline.generate import TONE_SAMPLES, LoadedPrior, draws_of, prior_tone
from pipeline.quality import report_draws

FIGURE = "quality/fd_ratio"  # lower is better
FIGURE_NAME = "FD ratio"
CHAMPION, CHALLENGER = "champion", "challenger"
STAGE = "quality"  # the stage of an evaluation run
PRIOR_RUN_TAG = "pipeline.prior_run_id"
# on a run that links figures: the fingerprint of the QualityReference they were judged by
REFERENCE_TAG = "quality.reference"


# a prior's figures against a reference

def pipeline_settings(prior_run):
    """(the sampling settings {name: value} the one command used for this prior, from its
    parent pipeline run's `sample.*` params, and its number of quality draws); ({}, None) for
    a prior trained on its own."""
    parent = prior_run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return {}, None
    data = tracking.client().get_run(parent).data
    draws = data.metrics.get("quality/draws")
    return ({k.split(".", 1)[1]: v for k, v in data.params.items() if k.startswith("sample.")},
            int(draws) if draws else None)


def typed_settings(family, settings):
    """Params are strings: give each sampling setting its field's type (None for 'None')."""
    kinds = {f.name: field_type(f) for f in dataclasses.fields(priors.sampling_class(family))}
    return {name: None if value in (None, "None") else kinds[name](value)
            for name, value in settings.items() if name in kinds}


def draw_figures(prior, reference, chosen, num_samples, draws, seed, tokenizer=None):
    """The quality figures of `draws` draws of `num_samples` samples (seeds seed, seed+1, ...)
    of a LoadedPrior against a QualityReference, tone-matched and decoded (by `tokenizer`, else
    the prior's own, loaded) as the one command does; `chosen`: its sampling settings and
    labels, as strings or values.
    -> (figures, {"labels", "num_samples", "sampling": the settings drawn with})"""
    labels = chosen.get("labels", "all" if prior.classes else None)
    labels = None if labels in (None, "None") or not prior.classes else labels
    sampling = priors.sampling_settings(prior.family, typed_settings(prior.family, chosen))
    drawn = dataclasses.asdict(sampling)  # what the prior's sample() takes
    tokenizer = tokenizer or prior.tokenizer()
    label_ids, num_samples = prior.label_ids(labels, num_samples)
    tone = prior_tone(prior, tokenizer, drawn, TONE_SAMPLES)
    images = draws_of(prior.model, tokenizer, range(seed, seed + draws), num_samples, label_ids,
                      None, tone, prior.precision, **drawn)
    requested = [prior.classes[i] for i in label_ids.tolist()] if label_ids is not None else None
    figures = report_draws(reference, images, requested)
    return figures, {"labels": labels, "num_samples": num_samples, "sampling": drawn}


def logged_model_id(run_id):
    """The id of the newest complete (READY) model a prior run logged; None when it logged
    none (a model whose logging failed or was cut short is FAILED or PENDING: not served)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    try:
        models = tracking.client().search_logged_models(
            experiment_ids=[tracking.client().get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    except MlflowException:  # a store without logged models (an old server): nothing to link
        return None
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


def link_figures(run_id, metrics, dataset, model_id=None, step=0, reference=None):
    """Log `metrics` on `run_id` naming the held-out `dataset` (an MLflow Dataset) and, when
    there is one, the logged model they judge: the Models tab then shows them on that model.
    reference: the QualityReference's fingerprint they were judged by, tagged on the run (a
    figure compares only with figures of the same reference: figure_of)."""
    tracking.log_metrics(run_id, metrics, step, model_id, dataset)
    if reference:
        tracking.client().set_tag(run_id, REFERENCE_TAG, reference)


def log_evaluation(prior, figures, params, heldout_input, command, data, experiment=None,
                   model_id=None, reference=None):
    """An evaluation run (stage `quality`, tag pipeline.prior_run_id) holding a prior's figures
    against held-out images: its inputs are the held-out dataset and the prior's logged model
    (`model_id`, else the newest its run logged), its metrics (quality/*, ceiling/*) are linked
    to both; reference: as link_figures. -> the run id."""
    from mlflow.entities import LoggedModelInput
    model_id = model_id or logged_model_id(prior.run_id)
    note = describe.description(
        f"Quality of prior run `{prior.run_id}` ({prior.family}) against held-out images",
        command=command, data=data)
    run_id = tracking.create_run(STAGE, experiment, run_name=f"quality {prior.family}",
                                 tags=describe.source_tags({
                                     PRIOR_RUN_TAG: prior.run_id, describe.NOTE_TAG: note,
                                     tracking.TOKENIZER_RUN_TAG: prior.tokenizer_run_id}))
    status = "FAILED"
    try:
        tracking.log_params(run_id, params)
        tracking.client().log_inputs(run_id, datasets=[heldout_input],
                                     models=[LoggedModelInput(model_id)] if model_id else None)
        # named as the one command names them on its pipeline run
        metrics = {(k if k.startswith("ceiling/") else f"quality/{k}"): v
                   for k, v in figures.items() if isinstance(v, (int, float))}
        link_figures(run_id, metrics, heldout_input.dataset, model_id, reference=reference)
        tracking.log_json(run_id, figures, "quality.json")
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status)
    return run_id


# the champion/challenger rule

def decide(new, champion, has_champion=True):
    """Where a new version goes: (CHAMPION or CHALLENGER, why). new, champion: their FIGURE on
    the same held-out data, or None when there is none (a prior registered without a quality
    step; a champion that could not be judged on this data); has_champion: whether the
    registered model has a @champion at all (none yet: the new version takes it)."""
    if not has_champion:
        return CHAMPION, "no champion yet"
    if new is None:
        return CHALLENGER, "no quality figure to compare with the champion's (no quality step)"
    if champion is None:
        return CHALLENGER, (f"{FIGURE_NAME} {new:.4f}, the champion has none on the same "
                            f"held-out data and could not be judged on it")
    if new < champion:
        return CHAMPION, f"{FIGURE_NAME} {new:.4f} beats the champion's {champion:.4f}"
    return CHALLENGER, f"{FIGURE_NAME} {new:.4f} does not beat the champion's {champion:.4f}"


def figure_of(model_id, dataset_digest, reference):
    """The newest FIGURE linked to a logged model on the held-out dataset with this digest,
    judged by the same QualityReference (`reference`, its fingerprint: the same training
    images, labels and feature space, which the FD ratio also depends on)."""
    if not model_id:
        return None
    client = tracking.client()
    metrics = [m for m in client.get_logged_model(model_id).metrics or []
               if m.key == FIGURE and m.dataset_digest == dataset_digest and m.run_id
               and client.get_run(m.run_id).data.tags.get(REFERENCE_TAG) == reference]
    return max(metrics, key=lambda m: m.timestamp).value if metrics else None


@dataclasses.dataclass
class HeldOut:
    """What a new version was judged on, so that the champion can be judged alike: the
    held-out dataset input (its digest says which images), the QualityReference, the version's
    figure, and the draws' size."""
    dataset_input: object  # mlflow.entities.DatasetInput
    reference: object  # pipeline.quality.QualityReference
    figure: float  # the new version's FIGURE on it
    num_samples: int
    draws: int
    seed: int = 0
    precision: str = "auto"
    experiment: str = None

    @property
    def digest(self):
        return self.dataset_input.dataset.digest

    def judge(self, prior_run_id, model_id):
        """The FIGURE of another prior on this reference, drawn with the sampling settings of
        its own pipeline run (its best ones) and this run's number of samples and draws (FD
        grows as the sample shrinks), kept in an evaluation run linked to its logged model
        `model_id`; None when its images are not of the held-out images' size or channels."""
        from pipeline.device import pick_device
        prior = LoadedPrior(prior_run_id, pick_device(), precision=self.precision)
        if not prior.tokenizer_run_id:
            return None
        tokenizer = prior.tokenizer()
        if tuple(self.reference.heldout.shape[1:]) != (
                tokenizer.in_channels, tokenizer.image_size, tokenizer.image_size):
            return None
        chosen, _ = pipeline_settings(prior.run)
        print(f"judging the champion (prior run {prior_run_id}) on the same held-out images",
              file=sys.stderr)
        figures, used = draw_figures(prior, self.reference, chosen, self.num_samples,
                                     self.draws, self.seed, tokenizer)
        params = describe.run_params(
            {"prior_run_id": prior_run_id, "heldout": self.dataset_input.dataset.name,
             "num_samples": used["num_samples"], "draws": self.draws, "seed": self.seed,
             "labels": used["labels"], "precision": prior.precision},
            {f"sample.{k}": v for k, v in used["sampling"].items()})
        log_evaluation(prior, figures, params, self.dataset_input,
                       command=describe.process_command(),
                       data=f"`{self.dataset_input.dataset.name}` (under *Datasets*), judged "
                            f"to rank it against a new version", experiment=self.experiment,
                       model_id=model_id, reference=self.reference.fingerprint)
        return figures["fd_ratio"]


def version_model_id(version):
    """The logged model a registered version was made from (the sqlite store leaves the
    version's model_id empty; its source is then `models:/<model id>`)."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def place(name, model_id, heldout=None):
    """Where the new version of `name` (its logged model `model_id`) goes against the current
    @champion: (alias, why, the champion's version or None). heldout: a HeldOut, or None when
    the new version had no quality step."""
    from mlflow.exceptions import MlflowException
    client = tracking.client()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None:
        return (*decide(None, None, has_champion=False), None)
    if version_model_id(champion) == model_id:  # the same model again (a reused prior)
        return CHAMPION, "the same model as the champion", champion.version
    if heldout is None:
        return (*decide(None, None), champion.version)
    champion_model = version_model_id(champion)
    old = figure_of(champion_model, heldout.digest, heldout.reference.fingerprint)
    if old is None and champion.run_id:
        try:
            old = heldout.judge(champion.run_id, champion_model)
        except Exception as e:  # its run or checkpoints gone, not a prior, ...: not judged
            print(f"warning: the champion (version {champion.version}) could not be judged: "
                  f"{tracking.describe_error(e)}", file=sys.stderr)
    return (*decide(heldout.figure, old), champion.version)
