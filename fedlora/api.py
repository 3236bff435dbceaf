"""Python API for experiments: run a federation through Flower, or a grid of them, and get tables.

Every run goes through the same ``flwr run`` path as ``fedlora simulate``: the same
ServerApp and ClientApp, no second engine.

>>> import fedlora
>>> res = fedlora.run(strategy="flora", clients=10, rounds=3)      # doctest: +SKIP
>>> res.to_dataframe()                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora import launch
from fedlora.config import CAUSAL_TASKS, HF_PREFIX, RunConfig, Scalar, keys_where
from fedlora.core import keys
from fedlora.core.errors import ConfigError, FedloraError, PairingError
from fedlora.core.rundir import (
    CONFIG,
    RESPONSE_CLIENTS,
    RESPONSES,
    SUMMARY,
    RunSummary,
    read_config,
    read_summary,
)
from fedlora.core.stats import Gain, paired_gain, t_interval, verdicts
from fedlora.data.names import natural_clients
from fedlora.presets import get_preset
from fedlora.progress import RunProgress

if TYPE_CHECKING:
    import pandas as pd

    from fedlora.launch import FlowerSession

__all__ = ["DEFAULT_CLIENTS", "Results", "Sweep", "load_results", "resume", "run", "session", "sweep"]

# The default benchmark: 20 clients with Dirichlet label skew over BBC News.
DEFAULT_CLIENTS = 20


@dataclass(frozen=True, repr=False)
class Results:
    """One finished run: its ``summary.json`` and where the run directory is."""

    summary: dict[str, Any]
    out_dir: Path

    def __repr__(self) -> str:
        # One line: the method, the headline figures and the folder (the summary is `summary`).
        final = self.summary.get("final", {})
        causal = not math.isnan(final.get("personalized_perplexity", math.nan))
        measure = "perplexity" if causal else "accuracy"
        shown = []
        for model in ("personalized", "global", "local_only"):
            value = final.get(f"{model}_{measure}", math.nan)
            if value is not None and not math.isnan(value):
                figure = f"{value:.1f}" if causal else f"{value:.1%}"
                shown.append(f"{model.replace('_', '-')} {figure}")
        return (
            f"Results({self.strategy}/{self.personalization}, {len(self.summary.get('rounds', []))} rounds, "
            f"{measure}: {', '.join(shown) or 'none'}; {self.out_dir})"
        )

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run configuration (``config.json``)."""
        return read_config(self.out_dir)

    @property
    def record(self) -> RunSummary:
        """The summary as typed records (`fedlora.core.rundir.RunSummary`)."""
        return RunSummary.from_dict(self.summary)

    @property
    def final(self) -> dict[str, Any]:
        """Final-round figures: accuracies, bytes per client per round, wall time."""
        return dict(self.summary["final"])

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Per-round metrics, in round order."""
        return list(self.summary["rounds"])

    @property
    def strategy(self) -> str:
        """The aggregation strategy of the run."""
        return str(self.summary.get("strategy", self.config.get("strategy", "")))

    @property
    def personalization(self) -> str:
        """The personalization method of the run (``auto`` resolved)."""
        return str(self.summary.get("personalization", ""))

    @property
    def seed(self) -> int:
        """The run's (training) seed."""
        return int(self.config.get("seed", 0))

    @property
    def partition_seed(self) -> int:
        """The seed of the run's data partition (its ``seed`` unless ``partition-seed`` was set)."""
        chosen = int(self.config.get("partition-seed", -1))
        return self.seed if chosen < 0 else chosen

    def to_dataframe(self) -> pd.DataFrame:
        """One row per round, with the run's strategy, personalization and seed as columns."""
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        frame = pd.DataFrame(self.rounds)
        frame.insert(0, "seed", self.seed)
        frame.insert(0, "personalization", self.personalization)
        frame.insert(0, "strategy", self.strategy)
        return frame

    def per_client(self) -> pd.DataFrame:
        """Final-round metrics of every client: global, personalized and local-only.

        ``client`` is the client's name (`fedlora.data.client_names`: its data folder, its
        natural id or its role, else its number; ``node-<id>`` for a deployed device) and
        ``partition`` its partition id (empty for a deployed device). Accuracy always; for
        causal LMs also held-out perplexity (``exp`` of the client's mean token loss).
        ``vs_global`` and ``vs_local_only`` say whether the personalized model is better (1),
        tied within the client's own noise (0) or worse (-1), from the paired per-example
        gains (``gain_over_global`` and its ``_se``); ``mix_weight`` is the weight a
        ``personal-mix`` client put on its personalized model; ``seed`` is the run's. Rows are
        in partition order,
        deployed devices last.
        """
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        clients = self.record.per_client
        partitions = clients.partitions()
        causal = self.config.get("task") in CAUSAL_TASKS
        rows = []
        for cid, client in sorted(
            clients.clients().items(), key=lambda item: _client_order(item[0], partitions)
        ):
            row = {
                "client": cid,
                "partition": partitions.get(cid),
                "global_accuracy": client.global_accuracy,
                "personalized_accuracy": client.personalized_accuracy,
                "local_only_accuracy": clients.local_only_accuracy.get(cid, math.nan),
            }
            if causal:
                losses = (
                    client.global_loss,
                    client.personalized_loss,
                    clients.local_only_loss.get(cid, math.nan),
                )
                for name, loss in zip(("global", "personalized", "local_only"), losses, strict=True):
                    row[f"{name}_perplexity"] = math.exp(loss) if not math.isnan(loss) else math.nan
            over_local = Gain(
                clients.local_only_gain.get(cid, math.nan), clients.local_only_gain_se.get(cid, math.nan)
            )
            over_global = Gain(client.gain_over_global, client.gain_over_global_se)
            row.update(
                {
                    "gain_over_global": over_global.mean,
                    "gain_over_global_se": over_global.se,
                    "vs_global": over_global.verdict(),
                    "vs_local_only": over_local.verdict() if not math.isnan(over_local.mean) else math.nan,
                    "mix_weight": client.mix_weight if client.mix_weight is not None else math.nan,
                }
            )
            rows.append(row)
        frame = pd.DataFrame(rows)
        # Integers with gaps for deployed devices (a plain column would turn them into floats).
        frame["partition"] = pd.array([row["partition"] for row in rows], dtype="Int64")
        frame.insert(0, "seed", self.seed)
        frame.insert(0, "personalization", self.personalization)
        frame.insert(0, "strategy", self.strategy)
        return frame

    def responses(self) -> list[dict[str, Any]]:
        """``task=chat``: the global and personalized replies to held-out prompts (`write_responses`).

        One dict per prompt: ``client``, ``prompt`` (the messages before the reply),
        ``reference`` (the held-out reply), ``global`` and ``personalized``; empty if the
        run wrote none (``responses-per-client=0``, or not a chat run).
        """
        path = self.out_dir / RESPONSES
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _client_order(cid: str, partitions: Mapping[str, int]) -> tuple[int, int | str]:
    # Simulated clients by partition id, then deployed devices ("node-<id>") by name.
    return (0, partitions[cid]) if cid in partitions else (1, cid)


def load_results(out_dir: str | Path) -> Results:
    """The `Results` of a finished run directory."""
    path = Path(out_dir).expanduser().resolve()
    return Results(read_summary(path), path)


# The session of the innermost `session` block, which `run`, `resume` and `sweep` use.
_SESSION: contextvars.ContextVar[launch.FlowerSession | None] = contextvars.ContextVar(
    "fedlora_session", default=None
)


@contextlib.contextmanager
def session(
    *, ray_address: str = "", warm_ray: bool = True, backend: str | None = None
) -> Iterator[launch.FlowerSession]:
    """A block whose federations share one warm Flower SuperLink and one Ray (or one warm process).

    Every `run`, `resume` and `sweep` inside the block uses it without being told, and skips
    what the session already started: the SuperLink (after the first run) and Ray (Flower's
    simulation would otherwise start and stop one per run). Runs stay independent: each has
    its own run id, configuration, seeds and results; a failed or interrupted run leaves
    the session usable. When the block ends, every process the session started is stopped.

    Parameters
    ----------
    ray_address : str
        Run on this existing Ray cluster (``HOST:PORT`` of its head) instead of the
        session's own.
    warm_ray : bool
        A Ray of the session's own on this machine, started with its first run (its workers
        see the environment variables of that moment); False: each run starts its own Ray.
    backend : str, optional
        ``"ray"`` (the default): each run's clients run on Ray actors, in parallel, which import torch,
        transformers and fedlora and load the base model afresh in every run. ``"warm"``: no
        Ray; the session starts one process that imports all of that once (with its first
        run), and each run's simulation is forked from it and runs its clients in turn, on
        every core. For small federations, a notebook's or a test suite's: a tiny run takes
        seconds instead of about half a minute. Runs with many clients on many cores finish
        sooner on ``"ray"``.

    Where the environment variable ``FEDLORA_SESSION`` names an open session (printed by
    `fedlora session` in a terminal), the block joins that session instead of opening
    one, if its backend is the one asked for (or none is asked for): a notebook's runs
    then start warm even after a kernel restart. Runs outside any block join it too.

    Examples
    --------
    >>> with fedlora.session():                                    # doctest: +SKIP
    ...     a = fedlora.run(strategy="fedavg", clients=10, rounds=3)
    ...     b = fedlora.run(strategy="ffa-lora", clients=10, rounds=3)
    >>> with fedlora.session(backend="warm"):                      # doctest: +SKIP
    ...     tiny = [fedlora.run(model="tiny-bert", clients=2, rounds=1, seed=s) for s in range(3)]

    """
    with launch.flower_session(ray_address, warm_ray=warm_ray, backend=backend) as opened:
        token = _SESSION.set(opened)
        try:
            yield opened
        finally:
            _SESSION.reset(token)


def run(
    *,
    strategy: str | None = None,
    personalization: str | None = None,
    clients: int | None = None,
    rounds: int | None = None,
    out: str | Path | None = None,
    data: str | Path | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    ray_address: str = "",
    on_event: Callable[[dict[str, Any]], None] | None = None,
    session: FlowerSession | None = None,
    preset: str | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    progress: bool | str = True,
    **overrides: Scalar,
) -> Results:
    """Run one simulated federation through Flower and return its results.

    Parameters
    ----------
    strategy, personalization : str, optional
        Names from ``fedlora.strategies.STRATEGIES`` and ``fedlora.personalization.PERSONALIZATIONS``
        (default: the preset's, else ``fedavg`` and ``auto``).
    clients : int, optional
        Simulated clients (default 20, or one per folder of ``data``).
    rounds : int, optional
        Federated rounds (default: the run config's ``num-server-rounds``).
    out : str or Path, optional
        Run directory (default ``runs/<timestamp>``).
    data : str or Path, optional
        A folder with one subfolder per client holding ``train.jsonl`` and ``test.jsonl``.
    cpus_per_client : float
        CPU cores per simulated client.
    gpus_per_client : float
        GPUs per simulated client (Flower's ``client-resources-num-gpus``; 0.25: four
        clients share one GPU).
    ray_address : str
        Run on this existing Ray cluster (``HOST:PORT`` of its head, or ``auto``) instead of
        a Ray of the run's own.
    on_event : callable, optional
        Called with every progress event (``metrics.jsonl`` lines) as the run goes.
    session : FlowerSession, optional
        Run on the SuperLink (and Ray) of a session (several runs in turn skip their
        start-up); by default the `fedlora.session` whose block the call is in, else the run
        starts and stops its own.
    preset : str, optional
        A workload from ``fedlora.presets.PRESETS`` (e.g. ``shakespeare``): its run config
        and client count are the starting point that the other arguments override.
    reuse : bool
        If ``out`` already holds a finished run of exactly this configuration and client
        count, load it instead of running again (notebooks re-executed for their plots);
        a run of another configuration there is replaced.
    overwrite : bool
        Replace a finished (or resumable) run already in ``out``; without it (or
        ``reuse``) such a folder is refused and left as it is.
    progress : bool or str
        Show the run's progress (a live bar in a terminal, a line per round in Jupyter or a
        log); a string shows it under that title; False shows nothing.
    **overrides
        Any run-config key, with underscores for dashes (``lora_rank=4``, ``seed=1``).

    Raises
    ------
    FedloraError
        Bad configuration or data (before anything starts), or a failed run.

    """
    if preset is not None:
        chosen = get_preset(preset)
        overrides = {**{k.replace("-", "_"): v for k, v in chosen.config.items()}, **overrides}
        clients = chosen.clients if clients is None else clients
    chosen_strategy = strategy or str(overrides.pop("strategy", "fedavg"))
    chosen_personalization = personalization or str(overrides.pop("personalization", "auto"))
    cfg = _config_of({**overrides, "rounds": rounds, "data": data}, chosen_strategy, chosen_personalization)
    num_clients = clients if clients is not None else default_clients(cfg)
    out_dir = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if reuse and _finished_run_of(out_dir, cfg, num_clients):
        if progress:
            print(f"{_titled(progress, 'reused the finished run in')} {out_dir}", flush=True)
        return load_results(out_dir)
    with _watched(progress, cfg.federation.num_server_rounds, on_event) as watch:
        summary = launch.simulate(
            cfg,
            num_clients=num_clients,
            out_dir=out_dir,
            cpus_per_client=cpus_per_client,
            gpus_per_client=gpus_per_client,
            ray_address=ray_address,
            on_event=watch,
            session=session or _SESSION.get(),
            overwrite=overwrite or reuse,
        )
        return _with_responses(Results(summary, out_dir.expanduser().resolve()), cfg, watch)


def _titled(progress: bool | str, text: str) -> str:
    return f"{progress}: {text}" if isinstance(progress, str) else text


def _watched(
    progress: bool | str, rounds: int, on_event: Callable[[dict[str, Any]], None] | None
) -> contextlib.AbstractContextManager[Callable[[dict[str, Any]], None] | None]:
    # The run's events through a progress display (`fedlora.progress`), then to ``on_event``.
    if not progress:
        return contextlib.nullcontext(on_event)
    title = progress if isinstance(progress, str) else ""
    return RunProgress(rounds, title=title, then=on_event)


def _with_responses(
    results: Results, cfg: RunConfig, on_event: Callable[[dict[str, Any]], None] | None
) -> Results:
    """``task=chat``: write the run's side-by-side replies (``responses-per-client``) next to its summary."""
    per_client = cfg.federation.responses_per_client
    # Where `launch.simulate` kept the clients' state.
    state_dir = Path(cfg.federation.client_state_dir or results.out_dir / "clients")
    if cfg.model.task != "chat" or not per_client or not state_dir.is_dir():
        return results
    if on_event:
        clients = min(RESPONSE_CLIENTS, len(results.record.per_client.final_round))
        on_event({"event": "responses", "clients": clients, "per_client": per_client})
    from fedlora.export import write_responses  # noqa: PLC0415 - heavy: torch, transformers

    write_responses(state_dir, results.out_dir / RESPONSES, per_client)
    return results


def resume(
    out: str | Path,
    *,
    rounds: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    ray_address: str = "",
    on_event: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | str = True,
) -> Results:
    """Go on with an interrupted (or finished) run from its last checkpoint.

    The run's own configuration (``config.json``) is used again, with ``rounds`` as the
    new total if given. Clients find their personal state where the run kept it.
    ``progress`` is as in `run`.

    Raises
    ------
    FedloraError
        If ``out`` holds no run, no checkpoint, or the run fails.

    """
    path = Path(out).expanduser().resolve()
    if not (path / CONFIG).is_file():
        raise FedloraError(f"{path}: not a fedlora run directory (no {CONFIG})")
    flat = read_config(path)
    flat["resume"] = True
    if rounds is not None:
        flat["num-server-rounds"] = rounds
    cfg = RunConfig.from_flat(flat)
    with _watched(progress, cfg.federation.num_server_rounds, on_event) as watch:
        summary = launch.simulate(
            cfg,
            num_clients=cfg.federation.min_clients,
            out_dir=path,
            cpus_per_client=cpus_per_client,
            gpus_per_client=gpus_per_client,
            ray_address=ray_address,
            on_event=watch,
            session=_SESSION.get(),
        )
        return _with_responses(Results(summary, path), cfg, watch)


def default_clients(cfg: RunConfig) -> int:
    """One client per folder of ``data-dir`` or natural id (``partitioner=natural``), else 20."""
    count = natural_clients(cfg.data, cfg.model.task, cfg.federation.data_seed)
    return DEFAULT_CLIENTS if count is None else count


_RUN_ARGS = (
    "clients",
    "rounds",
    "data",
    "cpus_per_client",
    "gpus_per_client",
    "ray_address",
    "on_event",
    "session",
    "overwrite",
    "progress",
)


def _config_of(flat: Mapping[str, Any], strategy: str, personalization: str) -> RunConfig:
    # The run config of `run`'s arguments (shared with `sweep`, which compares it to finished runs).
    cfg = {k.replace("_", "-"): v for k, v in flat.items() if k not in _RUN_ARGS}
    if flat.get("rounds") is not None:
        cfg["num-server-rounds"] = flat["rounds"]
    if flat.get("data") is not None:
        cfg["data-dir"] = str(Path(flat["data"]).expanduser().resolve())
    dataset = str(cfg.get("dataset", ""))
    if dataset.startswith(HF_PREFIX) and Path(dataset[len(HF_PREFIX) :]).expanduser().exists():
        # A local hf: dataset: clients run in other working directories.
        cfg["dataset"] = HF_PREFIX + str(Path(dataset[len(HF_PREFIX) :]).expanduser().resolve())
    if cfg.get("audit-wire-log"):
        # Clients run in other working directories: give them an absolute path.
        cfg["audit-wire-log"] = str(Path(str(cfg["audit-wire-log"])).expanduser().resolve())
    from fedlora import plan  # noqa: PLC0415 - heavy: the method registries import torch

    return plan.load({**cfg, "strategy": strategy, "personalization": personalization}).cfg


def _finished_run_of(run_dir: Path, cfg: RunConfig, clients: int) -> bool:
    if not (run_dir / SUMMARY).exists() or not (run_dir / CONFIG).exists():
        return False
    saved = read_config(run_dir)
    wanted = cfg.to_flat()
    # A key newer than the saved run was at its default there.
    defaults = RunConfig().to_flat()
    # Where a run keeps things, what `simulate` fills in, and values saved resolved are not what was run.
    ignored = keys_where("placement") | keys_where("resolved")
    same = all(saved.get(k, defaults[k]) == v for k, v in wanted.items() if k not in ignored)
    return same and saved.get("min-clients") == clients


# A sweep's figures per run, by task: accuracies for classification, perplexities for causal LMs.
_FIGURES = {
    False: ("personalized_accuracy", "global_accuracy", "local_only_accuracy"),
    True: ("personalized_perplexity", "global_perplexity", "local_only_perplexity"),
}
_VERDICTS = ("better", "tied", "worse")


class Sweep(list[Results]):
    """The runs of a `sweep`, with comparison tables.

    ``skipped`` lists the combinations the methods' rules exclude, as ``(strategy,
    personalization, why)``; ``varied`` the run-config keys the sweep varied besides
    strategy, personalization and seed (`sweep`'s ``vary``), which name a configuration too.
    """

    def __init__(
        self,
        runs: Iterable[Results] = (),
        skipped: Iterable[tuple[str, str, str]] = (),
        varied: Iterable[str] = (),
    ) -> None:
        super().__init__(runs)
        self.skipped: list[tuple[str, str, str]] = list(skipped)
        self.varied: tuple[str, ...] = tuple(varied)

    def _causal(self) -> bool:
        return bool(self) and self[0].config.get("task") in CAUSAL_TASKS

    def label(self, run: Results) -> str:
        """A run's configuration: ``strategy/personalization``, and its value of each varied key."""
        config = run.config
        varied = "".join(f" {k}={config.get(k)}" for k in self.varied)
        return f"{run.strategy}/{run.personalization}{varied}"

    def to_dataframe(self) -> pd.DataFrame:
        """One row per run: final figures (mean and worst-10% of clients), client outcomes, bytes, time.

        Accuracies for classification; for causal LMs also perplexities. The local-only
        figures come from the run of the same seed that measured them (a sweep measures the
        baseline once per seed: it does not depend on the method). ``better_than_global``,
        ``tied_with_global``, ``worse_than_global`` count the clients on which the
        personalized model beats, ties (within the client's own noise) or loses to the
        global model; ``..._local_only`` the same against the local-only model of that seed.
        """
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        causal = self._causal()
        measures = ("accuracy", "perplexity") if causal else ("accuracy",)
        baseline = {r.seed: r for r in self if r.final.get("local_only_accuracy") is not None}
        rows = []
        for r in self:
            f = r.final
            local = baseline[r.seed].final if r.seed in baseline else {}
            row: dict[str, Any] = {
                "config": self.label(r),
                "strategy": r.strategy,
                "personalization": r.personalization,
                "seed": r.seed,
                "partition_seed": r.partition_seed,
            }
            for m in measures:
                for model, found in (("personalized", f), ("global", f), ("local_only", local)):
                    row[f"{model}_{m}"] = _number(found.get(f"{model}_{m}"))
                    row[f"{model}_{m}_worst10"] = _number(found.get(f"{model}_{m}_worst10"))
            versus_global = f.get("personalized_vs_global") or {}
            versus_local = _versus_local_only(r, baseline.get(r.seed))
            for verdict in _VERDICTS:
                word = "than" if verdict != "tied" else "with"
                row[f"{verdict}_{word}_global"] = versus_global.get(verdict, math.nan)
                row[f"{verdict}_{word}_local_only"] = versus_local.get(verdict, math.nan)
            row.update(
                {
                    "mix_weight": f.get("mix_weight", math.nan),
                    "bytes_up_per_client_round": f["bytes_up_per_client_round"],
                    "bytes_down_per_client_round": f.get("bytes_down_per_client_round", math.nan),
                    "wall_s": f["wall_s"],
                    "out_dir": str(r.out_dir),
                }
            )
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self, baseline: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
        """One row per configuration (`label`), over its seeds.

        For each figure (personalized, global and local-only accuracy, or perplexity for
        causal LMs, and each one's worst 10% of clients): the mean, the sample standard
        deviation and a ``confidence`` interval of the mean (Student's t with n - 1 degrees
        of freedom; NaN with one seed); the clients better than, tied with and worse than
        the global and the local-only model and the mean ``personal-mix`` weight (means over
        seeds). Against ``baseline`` (a
        configuration's label, or a personalization name that one configuration has): the
        paired per-seed difference of the personalized and global figures, its interval,
        and whether the interval excludes 0 (the difference is distinguishable from noise).

        Raises
        ------
        ConfigError
            If ``baseline`` names no configuration of the sweep, or several.

        """
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        runs = self.to_dataframe()
        if runs.empty:
            return runs
        causal = self._causal()
        figures = [f for name in _FIGURES[causal] for f in (name, f"{name}_worst10")]
        counts = [c for c in runs.columns if c.split("_")[0] in _VERDICTS]
        configs = list(dict.fromkeys(runs["config"]))
        base = _baseline_of(baseline, configs, runs)
        rows = []
        for config in configs:
            mine = runs[runs["config"] == config]
            row: dict[str, Any] = {
                "config": config,
                "strategy": mine["strategy"].iloc[0],
                "personalization": mine["personalization"].iloc[0],
                "seeds": ",".join(str(s) for s in mine["seed"]),
            }
            for figure in figures:
                interval = t_interval(mine[figure], confidence)
                row.update(
                    {
                        f"{figure}_mean": interval.mean,
                        f"{figure}_sd": interval.sd,
                        f"{figure}_ci_low": interval.low,
                        f"{figure}_ci_high": interval.high,
                    }
                )
            row.update({c: mine[c].mean() for c in counts})
            row["mix_weight_mean"] = mine["mix_weight"].mean()
            if base is not None:
                theirs = runs[runs["config"] == base].set_index("seed")
                for figure in _FIGURES[causal][:2]:
                    paired = (mine.set_index("seed")[figure] - theirs[figure]).dropna()
                    diff = t_interval(paired, confidence)
                    row.update(
                        {
                            f"{figure}_vs_baseline_mean": diff.mean,
                            f"{figure}_vs_baseline_ci_low": diff.low,
                            f"{figure}_vs_baseline_ci_high": diff.high,
                            f"{figure}_vs_baseline_distinguishable": diff.excludes_zero,
                        }
                    )
            rows.append(row)
        return pd.DataFrame(rows)

    def rounds(self) -> pd.DataFrame:
        """Every run's per-round metrics, stacked."""
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        return pd.concat([r.to_dataframe().assign(config=self.label(r)) for r in self], ignore_index=True)

    def per_client(self) -> pd.DataFrame:
        """Every run's final per-client figures, stacked, with each run's configuration and seed.

        The local-only columns come from the run of the same seed that measured them.
        """
        import pandas as pd  # noqa: PLC0415 - heavy: pandas

        measured = {r.seed: r.per_client() for r in self if r.final.get("local_only_accuracy") is not None}
        frames = []
        for r in self:
            frame = r.per_client()
            local = measured.get(r.seed)
            if local is not None:
                by_client = local.set_index("client")
                for column in (c for c in local.columns if c.startswith("local_only_")):
                    frame[column] = frame["client"].map(by_client[column])
            frame.insert(0, "config", self.label(r))
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def _number(found: Any) -> float:
    return math.nan if found is None else float(found)


def _client_scores(run: Results, key: str) -> dict[int, tuple[float, ...]]:
    """Per-example held-out scores a simulated run's clients kept in their state, by partition id."""
    from fedlora.client.state import read_state  # noqa: PLC0415 - heavy: flwr's serde

    found: dict[int, tuple[float, ...]] = {}
    for path in sorted((run.out_dir / "clients").glob("federation-*/client-*.state")):
        if not path.stem[7:].isdigit():  # after "client-"
            continue
        try:
            record = read_state(path).config_records.get(key)
        except FedloraError:
            continue
        if record is not None:
            found[int(path.stem[7:])] = tuple(float(x) for x in record["scores"])  # type: ignore[union-attr]
    return found


def _versus_local_only(run: Results, local: Results | None) -> dict[str, int]:
    """Clients better than, tied with and worse than the local-only model of ``local``'s run (same seed).

    Paired per held-out example, from the scores the clients kept (simulations only); empty
    where the runs kept none.
    """
    if local is None:
        return {}
    if local is run:
        return dict(run.final.get("personalized_vs_local_only") or {})
    mine, theirs = _client_scores(run, keys.S_FINAL_SCORES), _client_scores(local, keys.S_LOCAL_ONLY_SCORES)
    shared = sorted(set(mine) & set(theirs))
    return verdicts(paired_gain(mine[pid], theirs[pid]) for pid in shared) if shared else {}


def _baseline_of(baseline: str | None, configs: list[str], runs: pd.DataFrame) -> str | None:
    """The configuration ``baseline`` names: a label, or a personalization that one configuration has.

    Raises
    ------
    ConfigError
        If it names none, or a personalization that several configurations ran.

    """
    if baseline is None:
        return None
    if baseline in configs:
        return baseline
    found = list(dict.fromkeys(runs[runs["personalization"] == baseline]["config"]))
    if len(found) != 1:
        how = "is none" if not found else "is ambiguous: give its label"
        raise ConfigError(
            f"baseline: {baseline!r} {how} of the sweep's configurations ({', '.join(configs)})"
        )
    return found[0]


def sweep(
    *,
    strategies: Iterable[str] | None = None,
    personalizations: Iterable[str] | None = None,
    seeds: Iterable[int] = (0,),
    vary: Mapping[str, Iterable[Scalar]] | None = None,
    out: str | Path = "runs/sweep",
    per_strategy: Mapping[str, Mapping[str, Scalar]] | None = None,
    reuse: bool = False,
    on_run: Callable[[Results], None] | None = None,
    **common: Any,
) -> Sweep:
    """Run every combination of strategy, personalization, varied setting and seed.

    Each run goes in ``out/<strategy>__<personalization>[__<key>-<value>...]__seed<n>``.
    ``seeds`` vary the training seed (``seed``: initialisation, batches, dropout, client
    sampling); the data partition follows it unless ``partition_seed`` is given in
    ``common``, which holds one split of the data fixed across seeds. ``vary`` adds axes
    of other run-config keys (``vary={"personal_mix": ["off", "validation"]}``).
    ``per_strategy`` adds run-config overrides for one strategy (e.g. ``client_ranks`` for
    ``flora``). The local-only baseline runs once per seed. Everything else in ``common``
    goes to `run` (``progress=False`` silences the runs' progress, which each shows under
    its number and folder); a ``preset`` there is the starting point of every run, as in `run`
    (its strategy and personalization when none are given, its client count).

    Every configuration is checked before anything runs: a bad or misspelt setting is a
    one-line `ConfigError`. Only combinations the methods' own rules exclude (e.g.
    ``fedsa-lora`` with ``ditto``) are skipped, listed in the result's ``skipped`` with
    the reason. With ``reuse``, a run directory that already holds a finished run of
    exactly this configuration is loaded instead of run again.

    Raises
    ------
    ConfigError
        A bad setting, or no combination left to run.

    """
    axes = {k: list(v) for k, v in (vary or {}).items()}
    common = dict(common)
    if (preset := common.pop("preset", None)) is not None:
        chosen = get_preset(preset)
        common = {**{k.replace("-", "_"): v for k, v in chosen.config.items()}, **common}
        common.setdefault("clients", chosen.clients)
    strategies = strategies or [str(common.pop("strategy", "fedavg"))]
    personalizations = personalizations or [str(common.pop("personalization", "auto"))]
    common.pop("strategy", None)
    common.pop("personalization", None)
    planned, skipped = _plan_sweep(
        list(strategies), list(personalizations), list(seeds), axes, per_strategy, common
    )
    ray_address = str(common.get("ray_address", ""))
    current = _SESSION.get()
    started = launch.flower_session(ray_address, warm_ray=True) if current is None else None
    with started or contextlib.nullcontext(current) as session:
        results = Sweep(skipped=skipped, varied=[k.replace("_", "-") for k in axes])
        for number, (run_dir, strategy, personalization, flat) in enumerate(planned, 1):
            shown = flat.pop("progress", True)
            result = run(
                strategy=strategy,
                personalization=personalization,
                out=Path(out) / run_dir,
                reuse=reuse,
                session=session,
                progress=f"run {number}/{len(planned)} {run_dir}" if shown else False,
                **flat,
            )
            results.append(result)
            if on_run is not None:
                on_run(result)
        return results


def _plan_sweep(
    strategies: list[str],
    personalizations: list[str],
    seeds: list[int],
    axes: Mapping[str, list[Scalar]],
    per_strategy: Mapping[str, Mapping[str, Scalar]] | None,
    common: Mapping[str, Any],
) -> tuple[list[tuple[str, str, str, dict[str, Any]]], list[tuple[str, str, str]]]:
    """The sweep's runs, each checked, and the combinations the methods' rules exclude.

    Runs are ``(folder, strategy, personalization, settings)``; exclusions ``(strategy,
    personalization, why)``.
    """
    planned: list[tuple[str, str, str, dict[str, Any]]] = []
    skipped: dict[tuple[str, str], str] = {}
    measured: set[int] = set()
    for seed in seeds:
        for strategy in strategies:
            for personalization in personalizations:
                for values in itertools.product(*axes.values()):
                    varied = dict(zip(axes, values, strict=True))
                    extra = dict((per_strategy or {}).get(strategy, {}))
                    flat = {**common, **extra, **varied, "seed": seed}
                    flat.setdefault("local_only_baseline", seed not in measured)
                    try:
                        _config_of(flat, strategy, personalization)
                    except PairingError as err:
                        skipped[(strategy, personalization)] = str(err)
                        continue
                    measured.add(seed)
                    named = "".join(f"__{k.replace('_', '-')}-{v}" for k, v in varied.items())
                    folder = f"{strategy}__{personalization}{named}__seed{seed}"
                    planned.append((folder, strategy, personalization, flat))
    if not planned:
        reasons = "; ".join(f"{s}/{p}: {why}" for (s, p), why in skipped.items())
        raise ConfigError(f"sweep: no combination to run ({reasons or 'no strategies or seeds'})")
    return planned, [(s, p, why) for (s, p), why in skipped.items()]
