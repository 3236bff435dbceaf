import tomllib
from pathlib import Path

import pytest

from fedlora import plan
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, ModelError
from fedlora.launch import parse_overrides
from fedlora.models import check_model

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_lists_every_key_with_the_library_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_flat()


def test_flat_round_trip_and_coercion():
    cfg = RunConfig.from_flat(
        {"lora-rank": "4", "lora-target-modules": "query, value", "local-only-baseline": "false"}
    )
    assert cfg.model.lora_rank == 4
    assert cfg.model.lora_target_modules == ("query", "value")
    assert cfg.federation.local_only_baseline is False
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"lora-rank": 0}, "lora-rank: must be a positive integer, got 0"),
        ({"lora-rank": -3}, "lora-rank: must be a positive integer, got -3"),
        ({"lora-rank": 2.5}, "lora-rank: must be an integer, got 2.5"),
        ({"partitioner": "zipf"}, "partitioner: must be one of dirichlet, iid, natural, got 'zipf'"),
        (
            {"dataset": "imagenet"},
            "dataset: must be one of bbc-news, shakespeare, shakespeare-chat, or hf:NAME (a Hugging Face "
            "dataset), got 'imagenet'",
        ),
        (
            {"strategy": "fedwhat"},
            "strategy: must be one of fedadam, fedalt, fedavg, fedavgm, fedex-lora, fedmedian, fedprox, "
            "fedsa-lora, fedyogi, ffa-lora, flexlora, flora, krum, trimmed-mean, got 'fedwhat'",
        ),
        (
            {"personalization": "magic"},
            "personalization: must be auto or one of ditto, dual, fedalt, feddpa, fedsa-lora, finetune, "
            "none, got 'magic'",
        ),
        (
            {"personalization": "fedsa-lora"},
            "personalization: 'fedsa-lora' does not fit strategy 'fedavg'; "
            "fedsa-lora as either needs fedsa-lora (or auto) as the other",
        ),
        (
            {"strategy": "fedsa-lora", "personalization": "ditto"},
            "personalization: 'ditto' does not fit strategy 'fedsa-lora'; "
            "fedsa-lora as either needs fedsa-lora (or auto) as the other",
        ),
        (
            {"client-ranks": "4,8,16"},
            "client-ranks: per-client ranks need strategy flexlora or flora (one rank for all: lora-rank), "
            "got 'fedavg'",
        ),
        ({"client-ranks": "4,x"}, "client-ranks: must be comma-separated positive integers, got '4,x'"),
        ({"proximal-mu": -1}, "proximal-mu: must be a number >= 0, got -1.0"),
        ({"trim-fraction": 0.5}, "trim-fraction: must be a number in [0, 0.5), got 0.5"),
        ({"task": "vision"}, "task: must be one of classification, causal-lm, chat, got 'vision'"),
        ({"test-fraction": 1.5}, "test-fraction: must be a number in (0, 1), got 1.5"),
        ({"learning-rate": "fast"}, "learning-rate: must be a number, got 'fast'"),
        ({"local-only-baseline": "maybe"}, "local-only-baseline: must be true or false, got 'maybe'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_accepted(flat, message):
    with pytest.raises(ConfigError) as err:
        plan.load(flat)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "flat",
    [
        {"strategy": "fedwhat"},
        {"personalization": "fedsa-lora"},
        {"dataset": "imagenet"},
        {"client-ranks": "4,8"},
    ],
)
def test_config_is_a_leaf_and_the_plan_applies_the_rules_between_methods(flat):
    # RunConfig knows no method registry: names and rules between methods are the plan's.
    cfg = RunConfig.from_flat(flat)
    with pytest.raises(ConfigError):
        plan.resolve(cfg)


def test_auto_resolves_to_the_strategy_s_own_method_else_dual():
    assert plan.load({"strategy": "fedsa-lora"}).personalization_name == "fedsa-lora"
    assert plan.load({"strategy": "flora"}).personalization_name == "dual"
    assert plan.load({"strategy": "fedavg", "personalization": "ditto"}).personalization_name == "ditto"


def test_unknown_key_suggests_the_closest_or_lists_accepted_keys():
    with pytest.raises(ConfigError, match=r"^lora-rnak: unknown run-config key; did you mean lora-rank\?$"):
        RunConfig.from_flat({"lora-rnak": 8})
    # Python's underscores on the command line, where keys are kebab-case.
    with pytest.raises(ConfigError, match=r"^lora_rank: unknown run-config key; did you mean lora-rank\?$"):
        RunConfig.from_flat({"lora_rank": 8})
    with pytest.raises(ConfigError, match=r"^colour: unknown run-config key; accepted keys: .*lora-rank"):
        RunConfig.from_flat({"colour": "blue"})


def test_unknown_model_is_refused_before_training():
    cfg = RunConfig.from_flat({"model": "no-such-model-anywhere"})
    with pytest.raises(ModelError, match=r"^model: 'no-such-model-anywhere' is not a bundled model"):
        check_model(cfg.model)


def test_bundled_and_local_folder_models_resolve(tmp_path):
    check_model(RunConfig.from_flat({"model": "minilm"}).model)
    from fedlora.models import model_source

    check_model(RunConfig.from_flat({"model": model_source("minilm")}).model)


def test_parse_overrides_reads_toml_values_and_bare_words():
    assert parse_overrides('lora-rank=4 model=tiny-bert lr=1e-3 x=true y="a b"'.replace(' b"', '_b"')) == {
        "lora-rank": 4,
        "model": "tiny-bert",
        "lr": 1e-3,
        "x": True,
        "y": "a_b",
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides("lora-rank")


def test_readme_configuration_reference_lists_every_key_with_its_default():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().strip("`")
        for line in table.splitlines()
        if line.startswith("| `")
    }
    flat = RunConfig().to_flat()
    assert set(rows) == set(flat)
    for key, value in flat.items():
        shown = tomllib.loads(f"v = {rows[key]}")["v"]
        assert shown == value, key
