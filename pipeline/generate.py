"""Generation and decoding by run id: prior run -> code grids -> VQ-VAE decoder -> PNGs.

A prior run finds its VQ-VAE through the tag `pipeline.vqvae_run_id`; before decoding, the
prior's vocabulary and grid are checked against the VQ-VAE checkpoint's.
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.codes import check_codes, codes_dtype, pick_artifact, read_npy
from pipeline.device import autocast, pick_device
from pipeline.errors import UserError
from pipeline.runs import load_run_checkpoint
from pipeline.visual import image_grid, save_png, save_pngs

LATEST_TAG = "pipeline.latest_generated"


def load_vqvae(vqvae_run_id, device, flag="--vqvae_run_id"):
    from vqvae.model import vqvae_from_checkpoint
    checkpoint = load_run_checkpoint(vqvae_run_id, "vqvae", "vqvae", flag=flag)
    return vqvae_from_checkpoint(checkpoint).to(device)


def vqvae_of(prior_run, flag="--run_id"):
    """The VQ-VAE run id a prior run was trained from (its lineage tag)."""
    vqvae_run_id = prior_run.data.tags.get(tracking.VQVAE_RUN_TAG)
    if not vqvae_run_id:
        raise UserError(f"{flag} {prior_run.info.run_id}: the prior was trained from a local "
                        f"file and names no VQ-VAE; decode with images_from_indexes.py "
                        f"--vqvae_run_id ID --indexes_path FILE")
    return vqvae_run_id


@torch.no_grad()
def decode_codes(vqvae, codes, device, batch_size=256):
    """codes LongTensor (N, h, w) -> images (N, C, S, S) in [0, 1] on the CPU."""
    out = []
    for start in range(0, len(codes), batch_size):
        with autocast(device):
            out.append(vqvae.decode_indices(codes[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def decode_and_log(vqvae, codes, device, log_run_id, name, out_dir=None, where=""):
    """Decode, log a grid (key "samples") and samples/<name>/*.png to `log_run_id`, and write
    the PNGs and grid.png to out_dir when given. Returns the images."""
    config = vqvae.config
    codes = check_codes(codes.numpy() if torch.is_tensor(codes) else codes,
                        config.codebook_size, where, (config.grid_size, config.grid_size))
    images = decode_codes(vqvae, codes, device)
    grid = image_grid(images[:64], ncol=8)
    tracking.log_image(log_run_id, grid, "samples", step=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_pngs(images, Path(tmp) / name)
        tracking.log_artifacts(log_run_id, Path(tmp) / name, f"samples/{name}")
    if out_dir:
        save_pngs(images, out_dir)
        save_png(grid, Path(out_dir) / "grid.png")
        print(f"wrote {len(images)} PNGs and grid.png to {out_dir}", file=sys.stderr)
    return images


def generate(run_id, num_samples=64, batch_size=None, temperature=1.0, top_k=None, top_p=None,
             seed=0, out_dir=None, no_decode=False, name=None, device=None):
    """Sample code grids from a prior run, log generated/<name>.npy, decode unless no_decode.
    Returns (codes LongTensor (N, h, w), name, seconds spent sampling, decoded images or None)."""
    from transformer.model import gpt_from_checkpoint
    from transformer.sample import sample
    if num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {num_samples}")
    prior_run = tracking.get_run(run_id, "transformer")
    device = pick_device(device)
    checkpoint = load_run_checkpoint(run_id, "transformer", "transformer")
    model = gpt_from_checkpoint(checkpoint).to(device)
    vqvae = None
    if not no_decode:  # check compatibility before spending time sampling
        vqvae = load_vqvae(vqvae_of(prior_run), device, flag="VQ-VAE run (from the prior's lineage tag)")
        check_prior_matches(model.config, vqvae.config, run_id)

    batch_size = batch_size or num_samples
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with autocast(device):
        chunks = [sample(model, min(batch_size, num_samples - i), temperature, top_k, top_p,
                         generator).cpu() for i in range(0, num_samples, batch_size)]
    seconds = time.perf_counter() - start
    codes = torch.cat(chunks)
    print(f"sampled {num_samples} grids ({codes[0].numel()} codes each) in {seconds:.2f} s: "
          f"{codes.numel() / seconds:.0f} codes/s", file=sys.stderr)

    name = name or time.strftime("gen-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, codes.numpy().astype(codes_dtype(model.config.vocab_size)))
        tracking.log_json(run_id, {"prior_run_id": run_id, "codebook_size": model.config.vocab_size,
                                   "grid": [model.config.grid_h, model.config.grid_w],
                                   "vqvae_run_id": prior_run.data.tags.get(tracking.VQVAE_RUN_TAG),
                                   "num_samples": num_samples, "temperature": temperature,
                                   "top_k": top_k, "top_p": top_p, "seed": seed},
                          f"generated/{name}.json")
        tracking.log_artifact(run_id, path, "generated")
    tracking.client().set_tag(run_id, LATEST_TAG, name)
    images = None
    if vqvae is not None:
        images = decode_and_log(vqvae, codes, device, run_id, name, out_dir,
                                where=f"--run_id {run_id} generated/{name}.npy")
    return codes, name, seconds, images


def check_prior_matches(prior_config, vqvae_config, run_id):
    if prior_config.vocab_size != vqvae_config.codebook_size:
        raise UserError(f"--run_id {run_id}: the prior's vocabulary ({prior_config.vocab_size}) "
                        f"does not match its VQ-VAE's codebook ({vqvae_config.codebook_size})")
    grid = (vqvae_config.grid_size, vqvae_config.grid_size)
    if (prior_config.grid_h, prior_config.grid_w) != grid:
        raise UserError(f"--run_id {run_id}: the prior's grid ({prior_config.grid_h}, "
                        f"{prior_config.grid_w}) does not match its VQ-VAE's {grid}")


def images_from_indexes(run_id=None, indexes=None, vqvae_run_id=None, indexes_path=None,
                        out_dir=None, device=None):
    """Decode a prior run's generated/<indexes>.npy, or any local file with a VQ-VAE run."""
    device = pick_device(device)
    if indexes_path:
        if not vqvae_run_id:
            raise UserError("--indexes_path needs --vqvae_run_id (the VQ-VAE that decodes it)")
        vqvae = load_vqvae(vqvae_run_id, device)
        array = read_npy(indexes_path)
        name = Path(indexes_path).stem
        return decode_and_log(vqvae, array, device, vqvae_run_id, name, out_dir,
                              where=str(indexes_path))
    if not run_id:
        raise UserError("give --run_id <prior run> [--indexes NAME], or "
                        "--vqvae_run_id ID --indexes_path FILE")
    prior_run = tracking.get_run(run_id, "transformer")
    if indexes is None:
        indexes = prior_run.data.tags.get(LATEST_TAG)
    name = pick_artifact(run_id, "generated", indexes, ".npy", "--run_id")
    vqvae = load_vqvae(vqvae_run_id or vqvae_of(prior_run), device)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, f"generated/{name}.npy", tmp)
        array = read_npy(path, f"--run_id {run_id} generated/{name}.npy")
    return decode_and_log(vqvae, array, device, run_id, name, out_dir,
                          where=f"--run_id {run_id} generated/{name}.npy")
