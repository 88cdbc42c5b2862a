"""The sampling settings are described once (priors/settings.py and each family's `Sampling`):
the script's flags, the pipeline's --sample.<flag>, the served model's request columns and
generated/<name>.json all derive from that description."""

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pandas as pd
import pytest
import torch

import priors
import transformer_generation
from core.config import field
from core.errors import UserError
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.generate import GenerationConfig, Generated, generate, tone_key
from pipeline.served import ServedGenerator, request_columns
from priors.settings import SamplingConfig
from transformer import absorbing, gpt
from transformer.absorbing import AbsorbingSampling


@dataclass
class WithEta(AbsorbingSampling):
    eta: Optional[float] = field(None, "a new absorbing option")


@dataclass
class WithBeta(SamplingConfig):
    beta: Optional[int] = field(None, "a new gpt option")


@pytest.fixture
def new_options(monkeypatch):
    """A field added to the absorbing family's sampling dataclass, and to the gpt's (which had
    none of its own): registered as the modules' `Sampling`, nothing else edited."""
    monkeypatch.setattr(absorbing, "Sampling", WithEta)
    monkeypatch.setattr(gpt, "Sampling", WithBeta, raising=False)


def help_text(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_the_registry_gives_each_family_its_dataclass_and_the_union_of_all():
    assert priors.sampling_class("absorbing") is AbsorbingSampling
    assert priors.sampling_class("gpt") is gpt.GPTSampling  # its KV cache's dtype
    for name in ("pixelcnn", "gated_pixelcnn", "pixelcnnpp", "pixelsnail"):
        assert priors.sampling_class(name) is SamplingConfig
    names = [f.name for f in dataclasses.fields(priors.all_sampling())]
    assert names == ["temperature", "top_k", "top_p", "guidance", "cache_dtype", "steps",
                     "stride", "sampler", "choice_temperature", "grid_h", "grid_w"]


def test_a_new_field_is_a_script_flag_a_pipeline_flag_and_a_request_column(new_options,
                                                                            capsys):
    script = help_text(transformer_generation.main, [], capsys)
    assert "--eta ETA" in script and "--beta BETA" in script and "--sampler SAMPLER" in script
    assert "[absorbing prior only]" in script and "[gpt prior only]" in script

    pipeline_absorbing = help_text(pipeline_main, ["--prior.prior", "absorbing"], capsys)
    assert "--sample.eta" in pipeline_absorbing and "--sample.sampler" in pipeline_absorbing
    assert "--sample.beta" not in pipeline_absorbing
    assert "--sample.grid_h" not in pipeline_absorbing  # pipeline.run.NOT_IN_PIPELINE
    pipeline_gpt = help_text(pipeline_main, ["--prior.prior", "gpt"], capsys)
    assert "--sample.beta" in pipeline_gpt and "--sample.sampler" not in pipeline_gpt
    assert "--sample.num_samples" in pipeline_gpt and "--sample.seed" not in pipeline_gpt

    columns = request_columns("absorbing")
    assert columns["eta"] == "number" and columns["sampler"] == "string"
    assert list(columns)[:2] == ["num_samples", "label"] and list(columns)[-1] == "seed"
    assert request_columns("gpt")["beta"] == "whole number"
    # the served model's checks take the new column, and the family's dataclass holds it
    served = ServedGenerator(SimpleNamespace(family="absorbing"), None, None)
    assert served._check(0, {"eta": 0.5, "sampler": "maskgit"})["sampling"] == \
        WithEta(sampler="maskgit", eta=0.5)
    with pytest.raises(UserError, match=re.escape("does not take --eta; --eta is for the "
                                                  "absorbing prior")):
        priors.sampling_settings("gpt", {"eta": 0.5})


def test_the_hand_written_lists_are_gone():
    import pipeline.__main__ as pipeline_cli
    import pipeline.run as run
    import pipeline.served as served
    assert not hasattr(pipeline_cli, "SAMPLE_FLAGS") and not hasattr(run, "SAMPLE_KEYS")
    assert not hasattr(served, "REQUEST_COLUMNS")
    assert not hasattr(transformer_generation, "SAMPLER_FLAGS")


class Grey:
    """A tokenizer stand-in for the served model: every grid decodes to a grey image."""

    def decode(self, codes):
        return torch.full((codes.shape[0], 1, 8, 8), 0.5)


def served(name):
    model = priors.build(name, {"vocab_size": 8, "grid_h": 3, "grid_w": 4, "n_layer": 1,
                                "n_head": 2, "n_embd": 16, "dropout": 0.0}).eval()
    calls = []
    sample = model.sample
    model.sample = lambda *args, **kwargs: calls.append(kwargs) or sample(*args, **kwargs)
    return ServedGenerator(model, Grey(), None), calls


def test_the_served_model_takes_sampler_for_an_absorbing_prior_and_refuses_it_for_a_gpt_one():
    from mlflow.exceptions import MlflowException
    model, calls = served("absorbing")
    answer = model.predict(pd.DataFrame([{"num_samples": 2, "sampler": "maskgit", "steps": 3,
                                          "choice_temperature": 1.0, "seed": 1}]))
    assert len(answer) == 2
    assert (calls[-1]["sampler"], calls[-1]["steps"], calls[-1]["choice_temperature"]) == \
        ("maskgit", 3, 1.0)
    for bad, match in (({"sampler": "greedy"}, "request 0: sampler must be one of absorbing, "
                                               "maskgit, got 'greedy'"),
                       ({"sampler": 3}, "request 0: sampler must be a string"),
                       ({"sampler": "absorbing", "choice_temperature": 1.0},
                        "request 0: choice_temperature is for sampler maskgit"),
                       ({"steps": 13}, "steps must be in 1..12"),
                       ({"steps": 0}, "steps must be in 1..12"),
                       # a larger grid is not served: one request could ask for any size
                       ({"grid_h": 4000}, "request 0: unknown field(s) grid_h"),
                       ({"temperature": -1.0}, "request 0: temperature must be >= 0")):
        with pytest.raises(MlflowException, match=re.escape(match)):
            model.predict(pd.DataFrame([bad]))

    model, calls = served("gpt")
    assert len(model.predict(pd.DataFrame([{"top_k": 2, "seed": 1}]))) == 1
    assert {k: v for k, v in calls[-1].items() if k != "generator"} == \
        {"temperature": 1.0, "top_k": 2, "top_p": None, "guidance": None, "cache_dtype": None}
    for column in ("sampler", "steps"):
        with pytest.raises(MlflowException, match=re.escape(f"request 0: unknown field(s) "
                                                            f"{column}")) as error:
            model.predict(pd.DataFrame([{column: "maskgit" if column == "sampler" else 3}]))
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_tone_keys_are_those_of_the_hand_written_settings():
    """The keys of the tone curves kept on prior runs: before the description, generate()
    hashed temperature, top_k, top_p, steps and guidance, set or not, and the options given."""
    def old_key(settings, count):
        return hashlib.sha256(json.dumps({**settings, "tone_samples": count},
                                         sort_keys=True).encode()).hexdigest()[:16]
    old = {"temperature": 1.25, "top_k": None, "top_p": None, "steps": None, "guidance": 1.3}
    new = dataclasses.asdict(SamplingConfig(temperature=1.25, guidance=1.3))
    assert tone_key(new, 4096) == old_key(old, 4096)
    old = {**old, "steps": 4, "sampler": "maskgit"}
    new = dataclasses.asdict(AbsorbingSampling(temperature=1.25, guidance=1.3, steps=4,
                                               sampler="maskgit"))
    assert tone_key(new, 256) == old_key(old, 256)


def test_generate_returns_a_named_result_that_its_json_records(chain):
    result = generate(chain["prior"], 3, seed=2, top_k=4, name="named", tone_samples=0)
    assert isinstance(result, Generated)
    record = tracking.load_json_artifact(chain["prior"], "generated/named.json")
    assert result.record == record and result.name == "named" and result.run_id == chain["prior"]
    assert result.codes.shape == (3, 4, 4) and record["grid"] == [4, 4]
    assert result.images.shape == (3, 1, 16, 16) and result.seconds > 0
    assert result.tone is None and record["tone"] is None
    assert result.sampling == gpt.GPTSampling(top_k=4)
    assert dataclasses.asdict(result.sampling).items() <= record.items()
    assert result.generation == GenerationConfig(num_samples=3, seed=2, tone_samples=0)
    assert {k: v for k, v in dataclasses.asdict(result.generation).items()
            if k != "labels"}.items() <= record.items()
    assert record["labels"] is None and result.labels is None  # the class of each sample
    assert (record["prior"], record["top_k"], record["temperature"]) == ("gpt", 4, 1.0)
    with pytest.raises(UserError, match=re.escape("the gpt prior does not take --steps; --steps "
                                                  "is for the absorbing prior")):
        generate(chain["prior"], 2, steps=3, no_decode=True)
