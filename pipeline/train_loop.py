"""The training loop every trainer runs (pipeline/train_tokenizer.py, pipeline/train_prior.py).

    state, checkpoint = open_run(ctx, STAGE, KIND, train, model, optimizer, generator,
                                 resume_run_id, start_run)
    ... (the trainer's own resume: a discriminator, say; DDP around the model)
    run_id = loop(ctx, Trainer(...), train, model, optimizer, generator, state, progress)

One plain loop: set the learning rate (pipeline/schedule.py), take one optimizer step, update the
weight average, log the step's values every 10 steps with the throughput, evaluate every
--eval_every steps (the lowest score writes checkpoints/best.pt), write checkpoints/last.pt every
--checkpoint_every steps, stop at --max_steps or when --max_minutes are spent, and close the run
as FINISHED, or FAILED if anything raised. SIGTERM (a scheduler, `docker stop`) or Ctrl-C stops
it gracefully after the current step: last.pt at that step, metrics sent, the run KILLED, and
core.errors.Terminated raised (exit status 143 for SIGTERM, 130 for Ctrl-C); a second signal
stops it at once. Under torchrun every process runs it and rank 0 alone logs, evaluates and
saves (pipeline/distributed.py).

What differs between trainers comes in a `Trainer`: how to take one step and what it logs, how
to evaluate and which score picks best.pt, its own checkpoint entries, what to do after an
evaluation, the throughput's unit. The loop's settings are fields of the trainer's TrainConfig:
batch_size, max_steps, learning_rate, eval_every, checkpoint_every, checkpoint_dir, and, where the
trainer offers them as flags, ema_decay and max_minutes; and lr_schedule, lr_decay and epochs
(pipeline/schedule.py):
    ema_decay    keep an exponential moving average of the weights (WeightAverage, with a
                 warm-up), which is what evaluation sees; its checkpoints then have an `ema`
                 entry (None when off)
    max_minutes  a time budget: the learning-rate schedule then follows whichever of it and
                 max_steps is further spent; its checkpoints then have a `trained_s` entry, so
                 that a resume goes on spending the same budget
"""

import copy
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from core.errors import Terminated, UserError
from pipeline import distributed
from pipeline.runs import SCRIPTS, resume
from pipeline.schedule import SCHEDULES, epochs_to_steps, learning_rate_at, steps_per_epoch

SPEED_LABELS = {"images": "img_s", "tokens": "tok_s"}  # the progress bar's throughput


# the settings, and the pieces of one optimizer step

def check_settings(train, world_size):
    """Step counts must be positive; the global batch must split evenly over the processes;
    ema_decay and max_minutes, where the trainer has them, must make sense."""
    for name in ("batch_size", "max_steps", "eval_every", "checkpoint_every"):
        if getattr(train, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(train, name)}")
    if train.batch_size % world_size:
        raise UserError(f"--batch_size {train.batch_size} must be a multiple of the number of "
                        f"processes ({world_size}): it is the global batch")
    max_minutes = getattr(train, "max_minutes", None)
    if max_minutes is not None and max_minutes <= 0:
        raise UserError(f"--max_minutes must be positive, got {max_minutes}")
    ema_decay = getattr(train, "ema_decay", None)
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise UserError(f"--ema_decay must be in (0, 1), got {ema_decay}")
    if train.lr_schedule not in SCHEDULES:
        raise UserError(f"--lr_schedule must be one of {', '.join(SCHEDULES)}, got "
                        f"'{train.lr_schedule}'")
    if train.lr_decay is not None and not 0 < train.lr_decay <= 1:
        raise UserError(f"--lr_decay must be in (0, 1], got {train.lr_decay}")
    if train.epochs is not None and train.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {train.epochs}")


def settle_budget(train, flags, resumed):
    """--epochs or --max_steps, not both: a resume that is given --max_steps extends the run
    in steps, whatever budget it started with. `flags`: the flags given on the command line."""
    if "epochs" in flags and "max_steps" in flags:
        raise UserError("--epochs and --max_steps both set the length of training: give one")
    if resumed and "max_steps" in flags:
        train.epochs = None


def apply_epochs(train, train_items):
    """With --epochs, set max_steps to that many passes over `train_items` items; returns the
    steps in one epoch (what the step schedule decays by)."""
    epoch_steps = steps_per_epoch(train_items, train.batch_size)
    if train.epochs is not None:
        train.max_steps = epochs_to_steps(train.epochs, train_items, train.batch_size)
    return epoch_steps


def check_finite(loss, run_id, step):
    """Stop with a message at a NaN/inf loss; checkpoints/last.pt still holds the last good state."""
    if not torch.isfinite(loss):
        raise UserError(f"run {run_id}: loss became {loss.item()} at step {step}; stopped. "
                        f"The last good checkpoint is checkpoints/last.pt "
                        f"(try a lower --learning_rate)")


def apply_gradients(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the gradient norm, step: the end of a step whose gradients were
    accumulated by one or more backward passes."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), with a warm-up.

    The update after step t (0-based) uses the decay min(decay, (1 + t) / (10 + t)): 0.1 at the
    first step, 0.5 at t = 8, 0.9 at t = 80, reaching 0.999 only after ~9,000 steps. A constant
    0.999 from a copy of the initial weights would still be 74% initial weights after 300
    steps, and short trainings and early evaluations would judge the initialisation. The step
    comes from the loop, so a resumed run goes on where it was; the checkpoint's `ema` entry is
    unchanged. Buffers are copied, not averaged."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model, step):
        weight = 1 - self.decay_at(step)
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current, weight)
        for average, current in zip(self.model.buffers(), model.buffers()):
            average.copy_(current)


# what a trainer gives the loop

def _nothing(*args):
    return None


@dataclass
class Trainer:
    """What differs between trainers. The loop sets the learning rate before each `step`, and
    calls the others on rank 0 only.

    label              the progress bar's description: "vqvae", "prior (gpt)"
    unit               "images" or "tokens": the throughput is logged as train/<unit>_per_sec
    loss, loss_digits  the logged value the progress bar shows, with this many decimals
    step(step, lr)     one optimizer step -> ({metric: scalar tensor, the same on every rank},
                       items trained on by all processes this step)
    evaluate(model)    -> ({metric: value}, score); `model` is the weight average when there is
                       one; a new lowest score (kept as best_val_loss) writes best.pt
    summary(metrics)   the progress line written after an evaluation, after "step N: "
    checkpoint()       the trainer's own checkpoint entries (kind, config, ...); the loop adds
                       model, optimizer, step, best_val_loss, train, rng, run_id (ema, trained_s)
    begin(run, model)  before the first step of a new run
    after_evaluation(run, model, step)   after an evaluation's metrics are logged
    after_step(run, model, step, final)  after every step's logging, evaluation and
                       checkpoint (`model` as evaluate's; final: the last step), except a step
                       stopped by a signal; its time is kept out of the throughput
    objective_changed(step)  True when the objective changed since the last evaluation:
                       best.pt then starts over
    epoch_steps        optimizer steps per pass over the training split (apply_epochs): the
                       step schedule decays once per epoch
    """
    label: str
    unit: str
    loss: str
    loss_digits: int
    step: Callable
    evaluate: Callable
    summary: Callable
    checkpoint: Callable
    begin: Callable = _nothing
    after_evaluation: Callable = _nothing
    after_step: Callable = _nothing
    objective_changed: Callable = _nothing
    epoch_steps: int = 1


@dataclass
class State:
    """Where a training starts: its run (rank 0's TrainingRun; None on other ranks), the run id
    (every rank), the step, the best score so far, the time spent and the weight average."""
    run: object
    run_id: str
    step: int = 0
    best_val_loss: float = float("inf")
    trained_s: float = 0.0
    average: Optional[WeightAverage] = None
    resumed: bool = False


def open_run(ctx, stage, kind, train, model, optimizer, generator, resume_run_id, start_run):
    """Start a new run (`start_run()` -> TrainingRun, called on rank 0) or resume `resume_run_id`
    from its newest checkpoints/last.pt (a `kind` checkpoint), loading the weights, optimizer,
    batch-order RNG and weight average on every rank. -> (State, the resumed checkpoint or
    None, for the trainer's own entries)."""
    ema_decay = getattr(train, "ema_decay", None)
    average = WeightAverage(model, ema_decay) if ema_decay else None
    if not resume_run_id:
        run = distributed.on_main(ctx, start_run)
        run_id = distributed.broadcast_str(ctx, run.run_id if ctx.is_main else None)
        return State(run, run_id, average=average), None
    run, checkpoint = resume(ctx, stage, kind, resume_run_id, train.checkpoint_dir, model,
                             optimizer, generator)
    if average is not None:
        average.model.load_state_dict(checkpoint.get("ema") or checkpoint["model"])
    run_id = distributed.broadcast_str(ctx, run.run_id if ctx.is_main else None)
    return State(run, run_id, checkpoint["step"], checkpoint["best_val_loss"],
                 checkpoint.get("trained_s", 0.0), average, resumed=True), checkpoint


# the loop

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class StopRequest:
    """Between `install()` and `restore()`, SIGTERM and Ctrl-C are a request that the loop
    reads between steps (`requested`); a second signal stops at once. Only the main thread can
    take signals, so elsewhere nothing is installed."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for number in SIGNAL_NAMES:
                self.previous[number] = signal.signal(number, self._handle)

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number, frame):
        if self.signal is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(f"stopped at once by a second {SIGNAL_NAMES[number]}", number)
        self.signal = number
        tqdm.write(f"{SIGNAL_NAMES[number]}: stopping after this step with a checkpoint "
                   f"({SIGNAL_NAMES[number]} again stops at once)", file=sys.stderr)

    def requested(self, ctx):
        """Whether any rank got a signal: all ranks stop after the same step."""
        return distributed.any_rank(ctx, self.signal is not None)


def loop(ctx, trainer, train, model, optimizer, generator, state, progress=True):
    """Train from `state` to --max_steps (or the end of --max_minutes) and close the run;
    returns the run id on rank 0, None on the other ranks."""
    run, run_id, average = state.run, state.run_id, state.average
    step, best_val_loss, trained_s = state.step, state.best_val_loss, state.trained_s
    evaluated = average.model if average is not None else model

    def checkpoint():
        # in the order of the checkpoints written before: what the model is, the loop's
        # entries, then the trainer's others
        own = trainer.checkpoint()
        head = {key: own.pop(key) for key in ("kind", "family", "config") if key in own}
        entries = {"model": model.state_dict()}
        if hasattr(train, "ema_decay"):
            entries["ema"] = average.model.state_dict() if average is not None else None
        entries.update(optimizer=optimizer.state_dict(), step=step, best_val_loss=best_val_loss)
        if hasattr(train, "max_minutes"):
            entries["trained_s"] = trained_s
        entries.update(train=asdict(train), rng=generator.get_state(), run_id=run_id)
        return {**head, **entries, **own}

    bar = tqdm(total=train.max_steps, initial=step, desc=trainer.label, unit="step",
               disable=not (progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
    window_start, window_items = time.perf_counter(), 0
    # With --max_minutes the schedule follows whichever budget is further spent, the steps or
    # the time, so the learning rate has decayed fully when either ends, whatever the speed;
    # trained_s survives a resume.
    max_minutes = getattr(train, "max_minutes", None)
    budget_s = 60 * max_minutes if max_minutes else None
    clock = time.perf_counter() - trained_s

    def time_spent():  # rank 0's clock on every rank, so all take the same lr and stop together
        spent = time.perf_counter() - clock
        return float(distributed.broadcast_str(ctx, repr(spent) if ctx.is_main else None))

    status, stop, stopped = "FAILED", StopRequest(), False
    stop.install()
    try:
        if ctx.is_main and not state.resumed:
            trainer.begin(run, model)
        model.train()
        while step < train.max_steps:
            scheduled = max(step, int(train.max_steps * trained_s / budget_s)) if budget_s \
                else step
            lr = learning_rate_at(scheduled, train.learning_rate, train.max_steps,
                                  train.lr_schedule, train.lr_decay, trainer.epoch_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs, items = trainer.step(step, lr)
            if average is not None:
                average.update(model, step)
            step += 1
            trained_s = time_spent() if budget_s else time.perf_counter() - clock
            final = step == train.max_steps or (budget_s is not None and trained_s >= budget_s)
            if stop.requested(ctx) and not final:  # checkpoint this step and end, as at the last
                stopped = final = True
            window_items += items
            bar.update(1)
            if not ctx.is_main:  # the rest (logging, evaluation, checkpoints) is rank 0's
                if final:
                    break
                continue

            if step % 10 == 0 or final:
                speed = window_items / (time.perf_counter() - window_start)
                window_start, window_items = time.perf_counter(), 0
                run.log_metrics({**{k: v.item() for k, v in logs.items()}, "train/lr": lr,
                                 f"train/{trainer.unit}_per_sec": speed}, step)
                bar.set_postfix(loss=f"{logs[trainer.loss].item():.{trainer.loss_digits}f}",
                                **{SPEED_LABELS[trainer.unit]: f"{speed:.0f}"})
            if (step % train.eval_every == 0 or final) and not stopped:
                metrics, score = trainer.evaluate(evaluated)
                run.log_metrics(metrics, step)
                trainer.after_evaluation(run, evaluated, step)
                bar.write(f"step {step}: {trainer.summary(metrics)}")
                if trainer.objective_changed(step):
                    best_val_loss = float("inf")  # best.pt: the best since the change
                if score < best_val_loss:
                    best_val_loss = score
                    run.save("best.pt", checkpoint())
                window_start = time.perf_counter()  # keep evaluation out of the throughput
            if step % train.checkpoint_every == 0 or final:
                run.save("last.pt", checkpoint())
            if not stopped:
                hook_start = time.perf_counter()
                trainer.after_step(run, evaluated, step, final)
                window_start += time.perf_counter() - hook_start  # not the throughput's
            if final:
                if step < train.max_steps and not stopped:
                    bar.write(f"stopped at step {step}: --max_minutes {max_minutes} spent")
                break
        status = "KILLED" if stopped else "FINISHED"
    finally:
        bar.close()
        try:
            if ctx.is_main:
                run.finish(status)
        finally:
            stop.restore()
    if stopped:
        cause = SIGNAL_NAMES.get(stop.signal, "a signal to another process")
        raise Terminated(f"run {run_id}: stopped by {cause} at step {step}, checkpoints/last.pt "
                         f"saved; `python {SCRIPTS[run.stage]} --resume_run_id {run_id}` "
                         f"continues" if ctx.is_main else
                         f"rank {ctx.rank}: stopped by {cause} at step {step}",
                         stop.signal or signal.SIGTERM)
    return run_id if ctx.is_main else None
