"""Presets, and the Shakespeare workload end to end in its small form (tiny causal LM)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import simulate_cli

from fedlora.core.errors import ConfigError
from fedlora.presets import PRESETS, get_preset


def test_presets_are_valid_run_configs_and_a_wrong_name_lists_them():
    from fedlora.config import RunConfig

    for preset in PRESETS.values():
        RunConfig.from_flat(preset.config)
        assert preset.clients > 0 and preset.summary
    expected = "preset: must be one of bbc-news, shakespeare, shakespeare-chat, got 'leaf'"
    with pytest.raises(ConfigError, match=expected):
        get_preset("leaf")


@pytest.mark.slow
def test_shakespeare_preset_small_runs_roles_as_clients_and_reports_perplexity(tmp_path, warm):
    out = tmp_path / "run"
    proc = simulate_cli(
        *("--preset", "shakespeare", "--clients", "3", "--rounds", "2", "--out", str(out)),
        *("--run-config", "model=tiny-llama max-length=16 local-steps=2 personal-steps=2 batch-size=4"),
        *("--backend", "warm"),  # joins the suite's warm session (Ray: test_end_to_end)
    )
    assert "held-out perplexity (lower is better)" in proc.stdout and "worst-10% clients" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["task"], config["model"]) == ("shakespeare", "causal-lm", "tiny-llama")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["clients_trained"] for r in summary["rounds"]] == [3, 3]
    final = summary["final"]
    for name in ("global_perplexity", "personalized_perplexity", "local_only_perplexity"):
        assert math.isfinite(final[name]) and final[name] > 1.0
        # The worst 10% of 3 clients is the worst one: its perplexity is at least the mean.
        assert final[f"{name}_worst10"] >= final[name]
    # Each client is reported under its role's name, with its partition id, in the summary and the table.
    roles = [
        "a-midsummer-night-s-dream/BOTTOM",
        "a-midsummer-night-s-dream/DEMETRIUS",
        "a-midsummer-night-s-dream/EGEUS",
    ]
    clients = summary["per_client"]["final_round"]
    assert [(name, c["partition"]) for name, c in clients.items()] == [(r, i) for i, r in enumerate(roles)]
    assert set(summary["per_client"]["local_only_loss"]) == set(roles)
    assert all(role in proc.stdout for role in roles)
