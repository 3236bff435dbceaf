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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlora import plan
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.rundir import GLOBAL_ADAPTER, ROUNDS
from fedlora.data import resolve_labels
from fedlora.lora.adapters import from_record, save_peft_adapter, to_record
from fedlora.models import build_model, lora_config
from fedlora.privacy.client_dp import wait_for_nodes, with_client_dp
from fedlora.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlora.server.recorder import RunRecorder
from fedlora.server.recording import Recorded
from fedlora.server.replies import client_id
from fedlora.server.secure import run_secure
from fedlora.server.validation import UploadCheck
from fedlora.strategies.base import checkpoint_state, initial_record

__all__ = ["run_federation", "default_out_dir"]

log = logging.getLogger(__name__)


def default_out_dir() -> Path:
    """``./runs/<UTC timestamp>`` relative to the ServerApp's working directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _local_only(grid: Grid, cfg: RunConfig, recorder: RunRecorder) -> None:
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
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            recorder.event(
                "client-error", round="local-only", node=reply.metadata.src_node_id, reason=reply.error.reason
            )
            continue
        metrics = reply.content.metric_records[keys.METRICS]
        accuracy, loss = metrics[keys.M_ACCURACY_LOCAL_ONLY], metrics.get(keys.M_LOSS_LOCAL_ONLY)
        client = client_id(metrics, reply.metadata.src_node_id)
        if isinstance(accuracy, (int, float)):
            recorder.local_only[client] = float(accuracy)
        if isinstance(loss, (int, float)):
            recorder.local_only_loss[client] = float(loss)


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
    labels = resolve_labels(cfg.data, cfg.model.task)
    loaded = build_model(cfg.model, len(labels), seed=fed.seed)
    out_dir = Path(fed.out_dir or default_out_dir()).expanduser().resolve()
    config = {**cfg.to_flat(), "labels": ",".join(labels)}
    resumed = None
    if fed.resume:
        resumed = load_checkpoint(out_dir, config)
    recorder = RunRecorder(
        out_dir,
        config,
        full_model_bytes=loaded.full_model_bytes,
        rounds=resumed.rounds if resumed else None,
        wall_s=resumed.wall_s if resumed else 0.0,
    )
    log.info("fedlora: writing results to %s", out_dir)
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
        return _finish(grid, cfg, recorder, labels)

    if resumed is not None:
        strategy, first_round, arrays = resumed.strategy, resumed.round + 1, to_record(resumed.arrays)
    else:
        strategy, first_round = info.builder(cfg), 1
        arrays = to_record(initial_record(info, loaded.initial_global))
        if cfg.privacy.client_level:
            strategy = with_client_dp(strategy, cfg, wait_for_nodes(grid, fed.min_clients))

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += first_round - 1
        if server_round >= first_round:
            save(out_dir / ROUNDS / f"round-{server_round:03d}", arrays)
            recorder.end_round(server_round)
            state = Checkpoint(
                server_round, from_record(arrays), strategy, recorder.rounds, config, recorder.elapsed()
            )
            save_checkpoint(out_dir, state)
        return None

    check = UploadCheck.for_run(
        info,
        loaded.initial_global,
        fed.max_update_norm,
        max_examples=fed.max_examples_per_client,
        unit_weight=cfg.privacy.client_level,
    )
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
    return _finish(grid, cfg, recorder, labels)


def _finish(grid: Grid, cfg: RunConfig, recorder: RunRecorder, labels: Sequence[str]) -> dict[str, Any]:
    """After the rounds: run the local-only baseline, write and log the summary."""
    fed = cfg.federation
    if fed.local_only_baseline:
        _local_only(grid, cfg, recorder)
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
