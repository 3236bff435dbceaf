"""The README's method tables, configuration reference and ``--help`` follow the registries."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import cli
from fedlora.docs import SECTIONS, render
from fedlora.personalization import PERSONALIZATIONS
from fedlora.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_s_generated_parts_are_up_to_date():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "README.md is stale: run `make docs`"


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_generated_part_has_a_row_per_entry(name):
    table = SECTIONS[name]()
    rows = [line for line in table.splitlines()[2:] if line.startswith("| `")]
    expected = {
        "strategies": STRATEGIES.names(),
        "personalizations": PERSONALIZATIONS.names(),
    }.get(name)
    if expected is not None:
        assert sorted(row.split("`")[1] for row in rows) == expected


def test_a_new_strategy_appears_in_the_table_and_the_help(monkeypatch, capsys):
    # What a contributor's one file does: register; the README table and --help follow.
    from fedlora.strategies.fedavg import build_fedavg
    from fedlora.strategies.registry import StrategyInfo

    info = StrategyInfo(
        "fedtoy", build_fedavg, paper="Toy et al., 2026", summary="a toy", description="averages toys"
    )
    monkeypatch.setitem(STRATEGIES._entries, "fedtoy", info)
    assert "| `fedtoy` | Toy et al., 2026 | averages toys | A, B, head | no | no | no |" in (
        SECTIONS["strategies"]()
    )
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    assert "fedtoy" in capsys.readouterr().out


def test_a_stale_readme_is_caught():
    readme = (ROOT / "README.md").read_text()
    stale = readme.replace("| `krum` |", "| `krum-old` |", 1)
    assert render(stale) != stale
