"""What only a CUDA GPU can check: `python -m pytest -q -m cuda tests` (benchmarks/
gpu_check.sh runs it with the rest of the GPU check). Without a GPU every test here skips."""

import pytest
import torch

import priors
from pipeline.device import autocast, needs_grad_scaler, resolve_precision
from transformer.gpt import sample_without_cache
from vqvae.model import VQVAE, VQVAEConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
GPT = {"vocab_size": 16, "grid_h": 4, "grid_w": 5, "n_layer": 2, "n_head": 2, "n_embd": 32,
       "dropout": 0.0, "num_classes": 3}


def test_auto_training_steps_on_cuda_keep_fp32_weights_and_a_loss_close_to_fp32s():
    precision = resolve_precision("auto", CUDA)
    assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    tokens, labels = torch.randint(16, (8, 4, 5), device=CUDA), torch.randint(3, (8,), device=CUDA)
    images = torch.rand(8, 1, 16, 16, device=CUDA)
    losses = {}
    for name in ("fp32", precision):
        torch.manual_seed(0)
        prior = priors.build("gpt", GPT).to(CUDA).train()
        vqvae = VQVAE(VQVAEConfig(in_channels=1, image_size=16, channels=16, codebook_size=16,
                                  code_dim=8, n_res_blocks=1)).to(CUDA).train()
        parameters = [*prior.parameters(), *vqvae.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(CUDA, name))
        with autocast(CUDA, name):
            _, prior_loss = prior(tokens, labels)
            _, vq_loss, _ = vqvae(images)
        scaler.scale(prior_loss + vq_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses[name] = (prior_loss.item(), vq_loss.item())
        assert all(p.dtype == torch.float32 for p in parameters)
    assert all(torch.isfinite(torch.tensor(losses[precision])))
    assert losses[precision][0] == pytest.approx(losses["fp32"][0], rel=0.02)
    assert losses[precision][1] == pytest.approx(losses["fp32"][1], rel=0.1)


def test_kv_cached_sampling_draws_what_uncached_sampling_draws_on_cuda():
    torch.manual_seed(0)
    model = priors.build("gpt", {**GPT, "num_classes": 0}).to(CUDA).eval()
    cached = model.sample(4, generator=torch.Generator(CUDA).manual_seed(1))
    uncached = sample_without_cache(model, 4, generator=torch.Generator(CUDA).manual_seed(1))
    assert cached.shape == (4, 4, 5) and torch.equal(cached, uncached)
    precision = resolve_precision("auto", CUDA)
    with autocast(CUDA, precision):
        fp32_cache = model.sample(4, generator=torch.Generator(CUDA).manual_seed(1))
        bf16_cache = model.sample(4, generator=torch.Generator(CUDA).manual_seed(1),
                                  cache_dtype="bf16")
    assert fp32_cache.is_cuda and fp32_cache.shape == bf16_cache.shape == (4, 4, 5)
    assert (fp32_cache == uncached).float().mean() > 0.8  # the same draw, nearly everywhere


def test_absorbing_sampling_runs_on_cuda_with_both_samplers_and_completion():
    torch.manual_seed(0)
    model = priors.build("absorbing", {**GPT, "num_classes": 0}).to(CUDA).eval()
    known = torch.randint(16, (3, 4, 5), device=CUDA)
    known_mask = torch.rand(3, 4, 5, device=CUDA) < 0.5
    for sampler in ("absorbing", "maskgit"):
        with autocast(CUDA, resolve_precision("auto", CUDA)):
            drawn = model.sample(3, known=known, known_mask=known_mask, steps=5,
                                 sampler=sampler, generator=torch.Generator(CUDA).manual_seed(0))
        assert drawn.is_cuda and drawn.shape == (3, 4, 5)
        assert drawn.min() >= 0 and drawn.max() < 16
        assert torch.equal(drawn[known_mask], known[known_mask])  # kept bit for bit
