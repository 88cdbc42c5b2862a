"""torchrun with two gloo processes on the CPU: one run, sharded batches, resume."""

import subprocess
import sys

import numpy as np
import torch

import train as train_prior_script
from conftest import ROOT, TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import tracking
from pipeline.distributed import Context, shard
from pipeline.images import ImageData, read_table


def torchrun(script, args, cwd):
    """`torchrun --standalone --nproc_per_node 2 script args` -> CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / script), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def runs_in(experiment):
    return tracking.client().search_runs([tracking.experiment_id(experiment)])


def test_ranks_split_every_global_batch_between_them(image_csv):
    data = ImageData(read_table(image_csv), 1, 16)
    def draw(rank, world_size):
        batches = data.batches(range(40), 8, torch.Generator().manual_seed(3), rank, world_size)
        return [next(batches) for _ in range(6)]  # past an epoch boundary (5 batches of 8)
    for whole, first, second in zip(draw(0, 1), draw(0, 2), draw(1, 2)):
        assert len(first) == len(second) == 4
        halves = torch.cat([first, second])
        # together the two ranks see exactly the single process's batch, each image once
        assert sorted(map(bytes, halves.numpy())) == sorted(map(bytes, whole.numpy()))
    picks = torch.arange(8)
    assert torch.equal(torch.sort(torch.cat([shard(Context(0, 2), picks),
                                             shard(Context(1, 2), picks)]))[0], picks)


def test_vqvae_under_torchrun_makes_one_run_and_resumes(store, image_csv):
    experiment = "torchrun-vqvae"
    # with two micro-batches per rank (no_sync on the first) and the adversarial loss from step 20
    args = ["--path_to_data", str(image_csv), "--max_steps", "40", "--eval_every", "20",
            "--checkpoint_every", "20", "--experiment", experiment, *TINY_VQVAE,
            "--accumulate", "2", "--adversarial_weight", "0.1", "--adversarial_start", "20",
            "--discriminator_channels", "8"]
    result = torchrun("train_vqvae.py", args, store)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [l for l in result.stdout.splitlines() if l.startswith("run_id=")]
    assert len(lines) == 1  # printed by rank 0 only
    run_id = lines[0].split("=")[1]
    (run,) = runs_in(experiment)  # exactly one run for the two processes
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    losses = tracking.client().get_metric_history(run_id, "train/vq_loss")
    assert [m.step for m in losses] == [10, 20, 30, 40]  # one value per step, not one per rank
    assert losses[-1].value < losses[0].value
    assert [m.step for m in tracking.client().get_metric_history(
        run_id, "train/discriminator_loss")] == [30, 40]

    result = torchrun("train_vqvae.py", ["--resume_run_id", run_id, "--max_steps", "60"], store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(runs_in(experiment)) == 1
    assert "resuming run" in result.stderr
    steps = [m.step for m in tracking.client().get_metric_history(run_id, "train/vq_loss")]
    assert steps == [10, 20, 30, 40, 50, 60]
    assert [m.step for m in tracking.client().get_metric_history(
        run_id, "train/discriminator_loss")] == [30, 40, 50, 60]


def test_prior_on_two_processes_matches_one_process(chain, store):
    """Global batch semantics: 2 ranks x 8 sequences take the same steps as 1 x 16."""
    args = ["--run_id", chain["vqvae"], "--max_steps", "30", "--eval_every", "30", *TINY_PRIOR]
    single = run_main(train_prior_script.main, [*args, "--experiment", "torchrun-prior-1"])
    result = torchrun("train.py", [*args, "--experiment", "torchrun-prior-2"], store)
    assert result.returncode == 0, result.stderr[-3000:]
    (double,) = runs_in("torchrun-prior-2")
    history = lambda run_id: np.array([m.value for m in tracking.client().get_metric_history(
        run_id, "train/nats_per_token")])
    assert len(history(single)) == 3  # logged every 10 steps
    # Same weights, same batches, gradients averaged over the halves: the same losses, up to
    # float summation order.
    np.testing.assert_allclose(history(double.info.run_id), history(single), rtol=1e-4)


def test_an_uneven_global_batch_is_a_clear_error(store, image_csv):
    result = torchrun("train_vqvae.py", ["--path_to_data", str(image_csv), "--batch_size", "15",
                                         "--max_steps", "2"], store)
    assert result.returncode != 0
    assert "error: --batch_size 15 must be a multiple of the number of processes (2)" in result.stderr


def _quantizer_worker(rank, world_size, init_file, z, out_dir, from_kmeans):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    torch.manual_seed(rank)  # different local randomness: only broadcasts may make them agree
    quantizer = _quantizer(from_kmeans)
    for _ in range(3):
        quantizer(z[rank::world_size])
    torch.save(quantizer.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _quantizer(from_kmeans):
    from vqvae.quantizer import VectorQuantizer
    quantizer = VectorQuantizer(8, 4, dead_code_threshold=0.5 if from_kmeans else 0.0).train()
    if not from_kmeans:  # a fixed start, so the EMA updates can be compared exactly
        quantizer.codebook.copy_(torch.linspace(-1, 1, 32).view(8, 4))
        quantizer.ema_sum.copy_(quantizer.codebook)
        quantizer.initialized.fill_(True)
    return quantizer


def test_quantizer_ranks_keep_one_codebook(tmp_path):
    """EMA statistics summed over two ranks' halves equal one process's update on the whole
    batch; k-means starts and dead-code restarts are rank 0's on both ranks."""
    import torch.multiprocessing as mp
    z = torch.randn(8, 4, 3, 3)
    for from_kmeans in (False, True):
        out = tmp_path / str(from_kmeans)
        out.mkdir()
        mp.spawn(_quantizer_worker, args=(2, str(out / "init"), z, str(out), from_kmeans),
                 nprocs=2)
        rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        for name in ("codebook", "ema_count", "ema_sum"):
            torch.testing.assert_close(rank0[name], rank1[name], msg=name)
        if not from_kmeans:
            single = _quantizer(False)
            for _ in range(3):
                single(z)
            torch.testing.assert_close(rank0["codebook"], single.codebook)


def test_a_rank_that_fails_ends_every_rank_with_one_line(store, tmp_path):
    """Rank 1 raises outside the guarded paths (a bug, a lost device) at step 5: rank 0, in a
    collective with it, stops with one line instead of waiting for gloo's half hour."""
    np.save(tmp_path / "codes.npy", np.random.default_rng(0).integers(0, 16, (64, 4, 4)))
    script = tmp_path / "faulty_train.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "import train\nfrom pipeline import train_loop\nfrom pipeline.cli import run_cli\n"
        "schedule = train_loop.learning_rate_at\n"
        "def learning_rate_at(step, *args):\n"
        "    if os.environ['RANK'] == '1' and step == 5:\n"
        "        raise RuntimeError('rank 1 broke')\n"
        "    return schedule(step, *args)\n"
        "train_loop.learning_rate_at = learning_rate_at\n"
        "run_cli(train.main)\n")
    result = torchrun(script, ["--path_to_data", str(tmp_path / "codes.npy"), "--codebook_size",
                               "16", *TINY_PRIOR, "--max_steps", "100000",
                               "--dist_timeout", "20", "--experiment", "rank-fails"], store)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: rank 0")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "another process failed or did not answer within --dist_timeout 20 s" in errors[0]
    (run,) = runs_in("rank-fails")
    assert run.info.status == "FAILED"
