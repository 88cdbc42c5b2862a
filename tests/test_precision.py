"""--precision auto | fp32 | bf16: auto picks bf16 autocast only where the chip multiplies bf16
matrices in hardware, fp32 works everywhere, runs record what they ran in, and the parts kept in
fp32 (codebook distances, the KV cache by default) stay fp32 under bf16 autocast."""

import json

import numpy as np
import pytest
import torch

import train as train_prior_script
import transformer_generation
from conftest import TINY_PRIOR, TINY_VQVAE, run_main
from core.errors import UserError
from pipeline import device as device_module, tracking
from pipeline.device import autocast, needs_grad_scaler, resolve_precision
from transformer.gpt import GPT, GPTConfig
from vqvae.quantizer import VectorQuantizer, squared_distances

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AMX_XEON = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16_ONLY = {"avx2", "avx512f", "avx512_bf16"}
AVX2_EPYC = {"avx2", "fma", "sse4_2"}


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU reports these /proc/cpuinfo flags (and forget earlier warnings)."""
    monkeypatch.setattr(device_module, "_warned", set())

    def pretend(flags):
        monkeypatch.setattr(device_module, "cpu_flags", lambda: set(flags))
    return pretend


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=16, grid_h=3, grid_w=4, num_classes=3, n_layer=2, n_head=2,
                         n_embd=32, dropout=0.0))


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(cpu_with):
    for flags, expected in ((AMX_XEON, "bf16"), (AVX512_BF16_ONLY, "bf16"), (AVX2_EPYC, "fp32"),
                            (set(), "fp32")):  # no /proc/cpuinfo (macOS): fp32
        cpu_with(flags)
        assert resolve_precision("auto", CPU) == expected, flags
        assert resolve_precision(None, "cpu") == expected  # unset is auto
        assert resolve_precision("fp32", CPU) == "fp32"  # forced fp32 works everywhere


def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert not needs_grad_scaler(CUDA, "bf16")
    # before Ampere: today's fp16 autocast, with loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_precision("auto", CUDA) == "fp16"
    assert needs_grad_scaler(CUDA, "fp16") and not needs_grad_scaler(CPU, "bf16")


def test_forced_bf16_without_units_runs_with_one_warning_and_a_bad_value_is_refused(cpu_with,
                                                                                   capsys):
    cpu_with(AVX2_EPYC)
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0]
    cpu_with(AMX_XEON)
    resolve_precision("bf16", CPU)
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp8", CPU)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
                       "flags\t\t: fpu sse2 avx2 avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert device_module.read_cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_bf16",
                                                     "amx_bf16", "amx_tile"}
    assert device_module.read_cpu_flags(tmp_path / "missing") == set()


def test_autocast_runs_matmuls_in_bf16_and_fp32_runs_none():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="unresolved"):
        autocast(CPU, "auto")


def test_a_bf16_training_step_keeps_fp32_weights_and_a_loss_close_to_fp32s():
    tokens, labels = torch.randint(16, (8, 3, 4)), torch.randint(3, (8,))
    losses = {}
    for precision in ("fp32", "bf16"):
        model = tiny_gpt().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with autocast(CPU, precision):
            _, loss = model(tokens, labels)
        loss.backward()
        optimizer.step()
        losses[precision] = loss.item()
        assert loss.dtype == torch.float32  # taken on fp32 logits (priors/heads.py)
        # master weights, gradients and optimizer state stay fp32: autocast, not .to(bf16)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in model.parameters())
        assert all(v.dtype == torch.float32 for state in optimizer.state.values()
                   for v in state.values() if v.is_floating_point())
    assert np.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_codebook_distances_stay_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 8, generator=generator)
    vectors = torch.randn(2048, 8, generator=generator)
    exact = squared_distances(vectors, codebook).argmin(1)
    # the test has teeth: in bf16 the expansion |v|^2 - 2 v.c + |c|^2 hands vectors to
    # other codes
    naive = (vectors.pow(2).sum(1, keepdim=True) - 2 * (vectors.bfloat16() @ codebook.bfloat16()
             .t()).float() + codebook.pow(2).sum(1)).argmin(1)
    assert (naive != exact).any()
    quantizer = VectorQuantizer(64, 8).eval()
    quantizer.codebook.copy_(codebook)
    z = vectors.view(32, 8, 8, 8).permute(0, 3, 1, 2)  # (B, D, h, w)
    with autocast(CPU, "bf16"):
        assert squared_distances(vectors, codebook).dtype == torch.float32
        assert torch.equal(squared_distances(vectors, codebook).argmin(1), exact)
        assert torch.equal(quantizer.indices(z).flatten(), exact)
        assert torch.equal(quantizer.indices(z.bfloat16()).flatten(),
                           squared_distances(vectors.bfloat16().float(), codebook).argmin(1))


def test_the_kv_cache_is_fp32_by_default_and_bf16_on_request():
    model = tiny_gpt().eval()
    with autocast(CPU, "bf16"):
        assert model.begin(2, None)["cache"].k.dtype == torch.float32
    assert model.begin(2, None, cache_dtype="bf16")["cache"].v.dtype == torch.bfloat16
    labels = torch.tensor([0, 1, 2, 0, 1])
    draws = {}
    for precision in ("fp32", "bf16"):
        for cache_dtype in (None, "bf16"):
            with autocast(CPU, precision):
                draws[precision, cache_dtype] = model.sample(
                    5, labels, generator=torch.Generator().manual_seed(1),
                    cache_dtype=cache_dtype)
            assert draws[precision, cache_dtype].shape == (5, 3, 4)
    # the same model, the same draw: the precisions and caches disagree only where two codes
    # were nearly equally likely
    for key, drawn in draws.items():
        assert (drawn == draws["fp32", None]).float().mean() > 0.8, key
    with pytest.raises(UserError, match="--cache_dtype must be one of fp32, bf16"):
        model.sample(2, cache_dtype="fp16")


def test_runs_record_the_precision_they_ran_in(store, image_csv, cpu_with, tmp_path):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.random.default_rng(0).integers(0, 16, (24, 3, 4)))
    for flags, expected in ((AMX_XEON, "bf16"), (AVX2_EPYC, "fp32")):
        cpu_with(flags)
        run_id = run_main(train_prior_script.main, [
            "--path_to_data", str(codes), "--codebook_size", "16", "--max_steps", "2",
            "--eval_every", "2", "--checkpoint_every", "2", "--device", "cpu", *TINY_PRIOR])
        run = tracking.client().get_run(run_id)
        assert run.data.params["precision"] == expected  # what auto became, never "auto"
        assert np.isfinite(run.data.metrics["val/nats_per_token"])
    import train_vqvae
    run_id = run_main(train_vqvae.main, [
        "--path_to_data", str(image_csv), "--max_steps", "2", "--eval_every", "2",
        "--checkpoint_every", "2", "--precision", "fp32", *TINY_VQVAE])
    assert tracking.client().get_run(run_id).data.params["precision"] == "fp32"


def test_generation_takes_precision_and_cache_dtype_and_records_them(chain):
    run_main(transformer_generation.main, [
        "--run_id", chain["prior"], "--num_samples", "3", "--name", "bf16_cache",
        "--no_decode", "--precision", "fp32", "--cache_dtype", "bf16"])
    record = tracking.load_json_artifact(chain["prior"], "generated/bf16_cache.json")
    assert (record["precision"], record["cache_dtype"]) == ("fp32", "bf16")
    assert json.dumps(record)  # plain values only


def test_the_one_command_has_one_precision_flag(capsys):
    from pipeline.__main__ import main as pipeline_main
    with pytest.raises(SystemExit):
        pipeline_main(["--help"])
    text = capsys.readouterr().out
    assert "--precision {auto,fp32,bf16}" in text
    assert "--prior.precision" not in text and "--tokenizer.precision" not in text
