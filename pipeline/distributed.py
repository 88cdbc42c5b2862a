"""Data-parallel training under torchrun: one process per device, rank 0 talks to MLflow.

    torchrun --standalone --nproc_per_node 2 train_vqvae.py --path_to_data data.csv ...

Every process runs the same trainer, inside `process_group()`. Rank 0 creates (or reopens) the one MLflow run, logs,
evaluates and writes checkpoints; every rank trains on its own slice of each batch, and
DistributedDataParallel averages the gradients. `--batch_size` stays the global batch, so a run
gives the same updates on 1 or N processes and can be resumed with a different N.

Without torchrun (WORLD_SIZE unset) everything here is a no-op and the trainers run as one plain
process.

A process that waits longer than --dist_timeout seconds (default 5 minutes) for the others in a
collective stops with one line: a rank that died or hangs (a lost node, an error outside the
guarded paths) ends every rank within that time, not after gloo's default half hour.
"""

import contextlib
import datetime
import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.device import pick_device
from core.errors import UserError

DEFAULT_TIMEOUT_S = 300.0  # --dist_timeout
TIMEOUT_HELP = ("under torchrun: seconds a process waits for the others in a collective before "
                "it stops with an error (a rank that died or hangs ends every rank)")


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


@contextmanager
def process_group(device_flag=None, timeout_s=None):
    """`with process_group(flag, --dist_timeout) as ctx:` joins torchrun's group for the block
    (nothing to join without torchrun) and leaves it afterwards, however the block ends. A
    collective that fails because another rank is gone or silent becomes one line."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    ctx = init(device_flag, timeout_s)
    try:
        yield ctx
        if ctx.enabled:
            # Leave together: a rank that tears gloo down while rank 0 is still logging can
            # abort at exit ("terminate called without an active exception"). Not after an
            # error, where the other ranks may be gone.
            dist.barrier()
    except Exception as e:
        if not (ctx.enabled and _collective_failure(e)):
            raise
        raise UserError(f"rank {ctx.rank}: stopping, another process failed or did not answer "
                        f"within --dist_timeout {timeout_s:g} s ({_first_line(e)})") from None
    finally:
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _collective_failure(e):
    """Whether `e` is a collective that failed on a dead or silent peer (gloo, NCCL)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    # gloo's are plain RuntimeErrors naming its source ("third_party/gloo/...: Timed out
    # waiting 300000ms for recv operation", "Connection closed by peer")
    return isinstance(e, RuntimeError) and any(
        sign in text for sign in ("gloo/", "Connection closed by peer",
                                  "Connection reset by peer", "NCCL"))


def _first_line(e):
    """The gist of a collective's error: its first sentence, less the source location
    ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:22664. ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def init(device_flag=None, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the torchrun process group, if launched by torchrun; pick this process's device
    (cuda:LOCAL_RANK with NCCL when there are GPUs, the CPU with gloo otherwise). Collectives
    give up after `timeout_s` seconds."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_flag)
    if world_size == 1:
        return Context(device=device)
    if not timeout_s > 0:
        raise UserError(f"--dist_timeout must be positive, got {timeout_s}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: LOCAL_RANK {local_rank} but only "
                            f"{torch.cuda.device_count()} GPUs here (lower --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Context(rank, world_size, device)


def wrap(ctx, model):
    """DistributedDataParallel around `model` (which stays the module to save and evaluate).
    Buffers are synced from rank 0 once, not before every step: the only ones that change, the
    VQ codebook's, are kept identical by the quantizer's own all-reduce."""
    if not ctx.enabled:
        return model
    # DDP warns that the gradients of 1x1 convolutions have other strides than their weights;
    # they differ only in size-1 dimensions, so the memory layout is the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
        forward_sync_buffers=False)


def no_sync(ctx, model, sync):
    """Gradient accumulation: DDP all-reduces gradients only when `sync` (the last micro-batch)."""
    if ctx.enabled and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def shard(ctx, batch):
    """This rank's slice of a global batch (every rank draws the same batch from one RNG)."""
    return batch[ctx.rank::ctx.world_size] if ctx.enabled else batch


def mean(ctx, value):
    """A scalar tensor averaged over ranks, so every rank sees the same loss (and the same NaN)."""
    if not ctx.enabled:
        return value
    value = value.detach().float().clone()
    dist.all_reduce(value)  # gloo has no AVG: sum, then divide
    return value / ctx.world_size


def any_rank(ctx, flag):
    """True on every rank if `flag` is true on any (a stop asked of one process stops all
    after the same step)."""
    if not ctx.enabled:
        return bool(flag)
    where = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    value = torch.tensor([int(bool(flag))], device=where)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def on_main(ctx, fn):
    """Rank 0 calls fn() and returns its result; the other ranks return None. If fn fails on
    rank 0, every rank fails too, so no rank waits forever for a rank that has stopped."""
    if not ctx.enabled:
        return fn()
    result, error = None, b""
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as e:
            error = (str(e) if isinstance(e, UserError) else "rank 0 failed").encode()
            _broadcast_bytes(ctx, error)
            raise
    message = _broadcast_bytes(ctx, error)
    if message:
        raise UserError(f"rank {ctx.rank}: stopping because {message.decode()}")
    return result


def broadcast_checkpoint(ctx, checkpoint):
    """Rank 0's checkpoint dict on every rank, sent as bytes and read back weights-only."""
    if not ctx.enabled:
        return checkpoint
    payload = b""
    if ctx.is_main:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        payload = buffer.getvalue()
    payload = _broadcast_bytes(ctx, payload)
    return checkpoint if ctx.is_main else torch.load(io.BytesIO(payload), map_location="cpu",
                                                     weights_only=True)


def broadcast_str(ctx, text):
    return _broadcast_bytes(ctx, (text or "").encode()).decode() if ctx.enabled else text


def _broadcast_bytes(ctx, payload):
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    where = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    size = torch.tensor([len(payload)], dtype=torch.long, device=where)
    dist.broadcast(size, src=0)
    if size.item() == 0:
        return b""
    data = torch.empty(size.item(), dtype=torch.uint8, device=where)
    if ctx.is_main:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return data.cpu().numpy().tobytes()
