"""The ``fedlora simulate`` command's arguments reach `fedlora.api.run` as given."""

from __future__ import annotations

import pytest

from fedlora import cli
from fedlora.personalization import PERSONALIZATIONS
from fedlora.strategies import STRATEGIES


def test_help_lists_every_strategy_and_personalization(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    text = capsys.readouterr().out
    for name in [*STRATEGIES, *PERSONALIZATIONS]:
        assert f"\n  {name} " in text, name


class _Stop(Exception):
    pass


def test_arguments_and_run_config_go_to_the_api(monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("fedlora.api.run", fake_run)
    with pytest.raises(_Stop):
        cli.main(
            [
                "simulate",
                "--strategy",
                "flora",
                "--personalization",
                "ditto",
                "--clients",
                "3",
                "--rounds",
                "4",
                "--run-config",
                "client-ranks=4,8 lora-alpha=8 ditto-lambda=0.5",
            ]
        )
    assert seen["strategy"] == "flora" and seen["personalization"] == "ditto"
    assert seen["clients"] == 3 and seen["rounds"] == 4
    assert seen["client_ranks"] == "4,8" and seen["lora_alpha"] == 8 and seen["ditto_lambda"] == 0.5


def test_a_mismatched_personalization_stops_with_one_line(capsys):
    assert cli.main(["simulate", "--strategy", "fedavg", "--personalization", "fedsa-lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "fedlora: error: personalization: 'fedsa-lora' does not fit strategy 'fedavg'; "
        "fedsa-lora as either needs fedsa-lora (or auto) as the other"
    )


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_name_reaches_the_api_from_the_command(monkeypatch, name):
    seen = {}
    monkeypatch.setattr("fedlora.api.run", lambda **kw: seen.update(kw) or (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        cli.main(["simulate", "--strategy", name])
    assert seen["strategy"] == name and seen["personalization"] == "auto"


@pytest.mark.parametrize("name", sorted(PERSONALIZATIONS))
def test_every_personalization_name_reaches_the_api_from_the_command(monkeypatch, name):
    seen = {}
    monkeypatch.setattr("fedlora.api.run", lambda **kw: seen.update(kw) or (_ for _ in ()).throw(_Stop()))
    strategy = "fedsa-lora" if name == "fedsa-lora" else "fedavg"
    with pytest.raises(_Stop):
        cli.main(["simulate", "--strategy", strategy, "--personalization", name])
    assert seen["personalization"] == name
