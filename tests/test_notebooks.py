"""The notebooks execute, in a reduced size, so that they cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import fedlora

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute_small(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list:
    """Run a notebook in its reduced size under ``tmp_path``; return its outputs, none an error.

    Its kernel's `fedlora.session` blocks join the suite's warm session (the `warm` fixture's
    ``$FEDLORA_SESSION``), as a user's notebook joins one that `fedlora session` keeps open.
    """
    monkeypatch.setenv("FEDLORA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("FEDLORA_NOTEBOOK_OUT", str(tmp_path / "runs"))
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


@pytest.mark.slow
def test_compare_strategies_notebook_runs_and_shows_its_table_and_plots(tmp_path, monkeypatch, warm):
    outputs = _execute_small("compare_strategies", tmp_path, monkeypatch)
    tables = [
        o
        for o in outputs
        if "text/html" in o.get("data", {}) and "personalized_accuracy" in o.data["text/html"]
    ]
    assert (
        len(tables) == 1
        and "fedavg" in tables[0].data["text/html"]
        and "flexlora" in tables[0].data["text/html"]
        and "local_only_accuracy" in tables[0].data["text/html"]
    )
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "fedavg__auto__seed0",
        "fedavg__none__seed0",
        "mixed-ranks",
    ]


@pytest.mark.federation
def test_privacy_utility_notebook_runs_and_shows_its_table_and_plot(tmp_path, monkeypatch, warm):
    outputs = _execute_small("privacy_utility", tmp_path, monkeypatch)
    tables = [
        o.data["text/html"]
        for o in outputs
        if "mia_advantage_personalized" in o.get("data", {}).get("text/html", "")
    ]
    assert len(tables) == 2 and "no DP" in tables[0] and "DP-SGD, shared adapter" in tables[0]
    assert "mia_advantage_chance" in tables[1] and "DP-SGD, everything" in tables[1]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "DP-SGD-shared-adapter-eps8",
        "no-DP",
        "personal15-DP-SGD-everything",
    ]


@pytest.mark.federation
def test_personal_language_models_notebook_runs_and_shows_perplexity_and_generations(
    tmp_path, monkeypatch, warm
):
    outputs = _execute_small("personal_language_models", tmp_path, monkeypatch)
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    per_role = [h for h in html if "personalized_perplexity" in h and "held-out lines" in h]
    assert len(per_role) == 1 and per_role[0].count("/") >= 3  # play/ROLE names
    generations = [h for h in html if "personalized model" in h and "My lord," in h]
    assert len(generations) == 1
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["personal-lm"]


@pytest.mark.federation
def test_personal_assistants_notebook_runs_and_shows_roles_and_replies(tmp_path, monkeypatch, warm):
    outputs = _execute_small("personal_assistants", tmp_path, monkeypatch)
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len([h for h in html if "worst 10% of roles" in h and "local-only" in h]) == 1
    per_role = [h for h in html if "personalized_perplexity" in h and "held-out exchanges" in h]
    assert len(per_role) == 1 and per_role[0].count("/") >= 3  # play/ROLE names
    replies = [h for h in html if "reply (held out)" in h]
    assert len(replies) == 1 and "personalized model" in replies[0]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["personal-chat"]
    _check_chat_run(fedlora.load_results(tmp_path / "runs" / "personal-chat"))


def _check_chat_run(result) -> None:
    """The notebook's run: the shakespeare-chat preset's small form (3 roles, 1 round)."""
    import math

    from fedlora.config import RunConfig
    from fedlora.data import load_client_data
    from fedlora.data.chat import decode

    assert result.personalization == "finetune"  # the preset's own, through fedlora.run
    final = result.final
    for key in ("global_perplexity", "personalized_perplexity", "local_only_perplexity"):
        assert math.isfinite(final[key]) and final[f"{key}_worst10"] >= final[key], key
    # Side by side: each client's first 3 held-out cues, answered by the global and the personalized model,
    # each reply under its client's name (its role) as in the per-client table.
    replies = result.responses()
    roles = list(result.per_client()["client"])
    assert len(roles) == 3 and all("/" in role for role in roles)
    assert [(r["client"], r["partition"]) for r in replies] == [
        (roles[p], p) for p in (0, 0, 0, 1, 1, 1, 2, 2, 2)
    ]
    cfg = RunConfig.from_flat(result.config)
    for client in (0, 1, 2):
        held_out = [decode(t) for t in load_client_data(cfg.data, "chat", client, 3, 0).test_texts[:3]]
        mine = [r for r in replies if r["partition"] == client]
        assert [r["prompt"] for r in mine] == [m[:1] for m in held_out]
        assert [r["reference"] for r in mine] == [m[1]["content"] for m in held_out]
        assert all(isinstance(r["global"], str) and isinstance(r["personalized"], str) for r in mine)
