"""The federation loop: build the initial adapter, run the strategy round by round, write results.

`run_federation` is the whole server side of a run, read top to bottom: resolve the
plan, seed the initial adapter, resume from a checkpoint if asked, wrap the strategy with
the round's bookkeeping (`fedlora.server.recording.Recorded`), run Flower's loop with a
checkpoint after every round, then the local-only baseline and the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora import plan
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError, DataError
from fedlora.core.rundir import GLOBAL_ADAPTER, RESULTS_LINE, ROUNDS
from fedlora.core.stats import Gain
from fedlora.data import client_names, resolve_labels
from fedlora.lora.adapters import from_record, save_peft_adapter, to_record
from fedlora.models import BUNDLED_MODELS, build_model, lora_config
from fedlora.privacy.client_dp import wait_for_nodes, with_client_dp
from fedlora.server.checkpoint import Checkpoint, load_checkpoint, restore_strategy, save_checkpoint
from fedlora.server.recorder import RunRecorder
from fedlora.server.recording import Recorded
from fedlora.server.replies import client_id, error_reason, value
from fedlora.server.runs_root import check_server_reads, deployed, held_run, run_directory
from fedlora.server.schema import LOCAL_ONLY
from fedlora.server.secure import run_secure
from fedlora.server.validation import Owners, UploadCheck, screen_replies
from fedlora.strategies.base import checkpoint_state, initial_record

__all__ = ["build_strategy", "run_federation"]

log = logging.getLogger(__name__)


def _local_only(grid: Grid, cfg: RunConfig, recorder: RunRecorder, check: UploadCheck) -> None:
    """Once per run: every client trains an adapter alone for the same number of steps."""
    steps = cfg.federation.num_server_rounds * (cfg.train.local_steps + cfg.train.personal_steps)
    recorder.event("local-only", steps=steps)
    messages = [
        Message(
            content=RecordDict({keys.CONFIG: ConfigRecord({keys.C_LOCAL_STEPS: steps})}),
            message_type=f"train.{keys.LOCAL_ONLY_ACTION}",
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies, _ = screen_replies(
        check,
        list(grid.send_and_receive(messages)),
        LOCAL_ONLY,
        "local-only",
        recorder,
        Owners(num_partitions=max(1, len(messages))),
        schema_round=cfg.federation.num_server_rounds,
    )
    for reply in replies:
        if reply.has_error():
            recorder.event(
                "client-error",
                round="local-only",
                node=reply.metadata.src_node_id,
                reason=error_reason(reply),
            )
            continue
        metrics = reply.content.metric_records[keys.METRICS]
        accuracy, loss = metrics[keys.M_ACCURACY_LOCAL_ONLY], metrics.get(keys.M_LOSS_LOCAL_ONLY)
        client = client_id(metrics, reply.metadata.src_node_id, recorder.names)
        if isinstance(accuracy, (int, float)):
            recorder.local_only[client] = float(accuracy)
        if isinstance(loss, (int, float)):
            recorder.local_only_loss[client] = float(loss)
        recorder.local_only_gain[client] = Gain(
            value(metrics, keys.M_GAIN_LOCAL_ONLY), value(metrics, keys.M_GAIN_LOCAL_ONLY_SE)
        )


def _client_names(grid: Grid, cfg: RunConfig) -> Callable[[], Sequence[str]] | None:
    """How results name simulated clients (`fedlora.data.client_names`), or None in a deployment.

    A deployed device sends no partition id and is named ``node-<id>``. The names are
    looked up when the first client is named: by then every simulated node is registered,
    and their number is the run's number of partitions.
    """
    if deployed():
        return None

    def names() -> Sequence[str]:
        num_nodes = len(list(grid.get_node_ids()))
        try:
            return client_names(cfg.data, cfg.model.task, num_nodes, cfg.federation.data_seed)
        except DataError as err:
            # Names only label results: a run whose clients the server cannot name keeps their numbers.
            log.warning("fedlora: clients are named by their partition id: %s", err)
            return ()

    return names


def build_strategy(
    cfg: RunConfig, resumed: Checkpoint | None, count_nodes: Callable[[], int]
) -> tuple[Strategy, int | None]:
    """The run's strategy, wrapped for client-level DP if asked, with ``resumed``'s state set on it.

    Returns the strategy and the population its DP accountant was built for (None without
    client-level DP): counted by ``count_nodes`` in a fresh run, kept by the checkpoint
    for a resumed one.

    Raises
    ------
    ConfigError
        If ``resumed`` holds state that does not fit this strategy.

    """
    strategy, num_nodes = plan.resolve(cfg).strategy.builder(cfg), None
    if cfg.privacy.client_level:
        num_nodes = resumed.num_nodes if resumed and resumed.num_nodes else count_nodes()
        strategy = with_client_dp(strategy, cfg, num_nodes)
    if resumed is not None:
        restore_strategy(strategy, resumed)
    return strategy, num_nodes


def run_federation(grid: Grid, cfg: RunConfig, context: Context) -> dict[str, Any]:
    """Run the configured strategy for ``num-server-rounds`` and write the run directory.

    Returns the summary that was written to ``summary.json``. ``context`` (the
    ServerApp's) is needed for secure aggregation, which runs on Flower's legacy workflow.
    """
    import torch  # noqa: PLC0415 - heavy: only the ServerApp's process needs it

    info = plan.resolve(cfg).strategy
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    fed = cfg.federation
    out_dir = run_directory(fed.out_dir)  # inside the server's runs folder, whatever the run config says
    if not fed.resume and (held := held_run(out_dir)):
        # A second run into one folder never replaces the first's results.
        raise ConfigError(
            f"out-dir: {out_dir} already holds a run ({held}); name another folder, or resume it"
        )
    if deployed():
        check_server_reads(cfg, frozenset(BUNDLED_MODELS))
    labels = resolve_labels(cfg.data, cfg.model.task)
    loaded = build_model(cfg.model, len(labels), seed=fed.seed)
    config = {**cfg.to_flat(), "out-dir": str(out_dir), "labels": ",".join(labels)}
    resumed = None
    if fed.resume:
        resumed = load_checkpoint(out_dir, config)
    recorder = RunRecorder(
        out_dir,
        config,
        full_model_bytes=loaded.full_model_bytes,
        rounds=resumed.rounds if resumed else None,
        wall_s=resumed.wall_s if resumed else 0.0,
        names=_client_names(grid, cfg),
    )
    log.info("%s %s", RESULTS_LINE, out_dir)
    if resumed:
        recorder.event("resume", from_round=resumed.round, num_rounds=fed.num_server_rounds)
    recorder.event("start", num_rounds=fed.num_server_rounds, out_dir=str(out_dir))

    def save(directory: Path, arrays: ArrayRecord) -> None:
        state, base_delta, rank = checkpoint_state(
            from_record(arrays),
            loaded.initial_global,
            factored=info.protocol.factored,
            alpha=cfg.model.lora_alpha,
        )
        config = lora_config(cfg.model if rank is None else dataclasses.replace(cfg.model, lora_rank=rank))
        save_peft_adapter(directory, state, config, base_delta=base_delta)

    check = UploadCheck.for_run(info, loaded.initial_global, cfg)
    if cfg.privacy.secure_aggregation:
        final = run_secure(
            grid,
            context,
            cfg,
            initial_record(info, loaded.initial_global),
            recorder,
            lambda server_round, state: save(
                out_dir / ROUNDS / f"round-{server_round:03d}", to_record(state)
            ),
        )
        save(out_dir / GLOBAL_ADAPTER, to_record(final))
        return _finish(grid, cfg, recorder, labels, check)

    strategy, num_nodes = build_strategy(cfg, resumed, lambda: wait_for_nodes(grid, fed.min_clients))
    if resumed is not None:
        first_round, arrays = resumed.round + 1, resumed.record()
    else:
        first_round, arrays = 1, to_record(initial_record(info, loaded.initial_global))

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += first_round - 1
        if server_round >= first_round:
            save(out_dir / ROUNDS / f"round-{server_round:03d}", arrays)
            recorder.end_round(server_round)
            state = Checkpoint(
                server_round, from_record(arrays), recorder.rounds, config, recorder.elapsed(), num_nodes
            )
            save_checkpoint(out_dir, state, strategy)
        return None

    recorded = Recorded(
        strategy,
        recorder,
        check,
        first_round=first_round,
        min_reply_fraction=fed.min_reply_fraction,
        seed=fed.seed,
    )
    remaining = fed.num_server_rounds - first_round + 1
    if remaining > 0:
        result = recorded.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=remaining,
            timeout=fed.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=end_of_round,
        )
        arrays = result.arrays if len(result.arrays) else arrays
    save(out_dir / GLOBAL_ADAPTER, arrays)
    return _finish(grid, cfg, recorder, labels, check)


def _finish(
    grid: Grid, cfg: RunConfig, recorder: RunRecorder, labels: Sequence[str], check: UploadCheck
) -> dict[str, Any]:
    """After the rounds: run the local-only baseline, write and log the summary."""
    fed = cfg.federation
    if fed.local_only_baseline:
        _local_only(grid, cfg, recorder, check)
    summary = recorder.summary(
        labels=list(labels), strategy=fed.strategy, personalization=plan.resolved_personalization(cfg)
    )
    final = summary["final"]
    log.info(
        "fedlora: global %.3f, personalized %.3f, local-only %s",
        final["global_accuracy"],
        final["personalized_accuracy"],
        "n/a"
        if final["local_only_accuracy"] is None or math.isnan(final["local_only_accuracy"])
        else f"{final['local_only_accuracy']:.3f}",
    )
    return summary
