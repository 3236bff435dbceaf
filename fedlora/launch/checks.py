"""Everything checked before Flower starts: configuration, model, data, folders and GPUs, each in one line."""

from __future__ import annotations

import logging
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, DataError
from fedlora.data import DATASETS
from fedlora.data.federated import validate_data
from fedlora.data.jsonl import SPLITS
from fedlora.models import TEST_MODELS, check_model, model_source
from fedlora.models.device import check_compute
from fedlora.server.runs_root import held_run

# The package's logger, as before the package split.
log = logging.getLogger("fedlora.launch")

__all__ = ["check_gpus", "check_layout", "preflight", "refuse_finished_run"]


def preflight(cfg: RunConfig, num_clients: int) -> RunConfig:
    """Check model and every client's data before anything starts; fill in the label set.

    Raises
    ------
    FedloraError
        The first problem found, in one line naming the field or path.

    """
    from fedlora import plan  # noqa: PLC0415 - heavy: the method registries import torch

    plan.resolve(cfg)
    if num_clients <= 0:
        raise ConfigError(f"clients: must be a positive integer, got {num_clients}")
    check_model(cfg.model)
    if cfg.model.model in TEST_MODELS:
        log.warning(
            "model=%s is a test model with random weights: it learns next to nothing in a few steps, "
            "so strategies and methods compared on it look alike; compare on minilm or smollm2",
            cfg.model.model,
        )
    model = cfg.model
    plain = (model.precision, model.base_dtype, model.quantization) == ("fp32", "float32", "none")
    if not (plain and model.device in ("auto", "cpu")):
        # Only a device or format named outright can be missing (this check imports torch).
        check_compute(model)
    if cfg.model.task == "chat":
        _check_chat(cfg)
    labels = validate_data(cfg.data, cfg.model.task, num_clients, cfg.federation.data_seed)
    if cfg.model.task == "classification" and len(labels) < 2:
        raise DataError(
            f"labels: classification needs at least 2 labels, the data has {len(labels)} "
            f"({', '.join(labels) or 'none'}); use task=causal-lm for text without classes"
        )
    return cfg.replace(labels=",".join(labels)) if labels and not cfg.data.labels else cfg


def check_layout(cfg: RunConfig, out_dir: Path) -> None:
    """Refuse a ``data-dir`` that is one client's folder, and a run directory inside the data.

    Raises
    ------
    FedloraError
        In one line, naming the folder.

    """
    if not cfg.data.data_dir:
        return
    root = Path(cfg.data.data_dir).expanduser().resolve()
    if any((root / f"{split}.jsonl").is_file() for split in SPLITS):
        raise DataError(
            f"data-dir: {root} holds train.jsonl and test.jsonl itself, one client's data; a simulation "
            "needs one subfolder per client (DIR/<client>/train.jsonl, DIR/<client>/test.jsonl)"
        )
    if out_dir == root or root in out_dir.parents:
        raise ConfigError(
            f"out: {out_dir} is inside the data folder {root}, where the next run would read it as a "
            "client; choose a folder outside it"
        )


def _check_chat(cfg: RunConfig) -> None:
    """Chat needs chat records and a template to render them with."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    from fedlora.train.chat import template_for  # noqa: PLC0415 - heavy: torch

    # data-dir and hf: datasets are checked record by record as they load.
    if not cfg.data.data_dir and not cfg.data.hf_dataset and not DATASETS.get(cfg.data.dataset).chat:
        raise ConfigError(
            "task: chat reads conversations or prompt-completion records from data-dir or an hf: dataset; "
            f"the bundled dataset {cfg.data.dataset!r} holds plain text"
        )
    template_for(
        AutoTokenizer.from_pretrained(model_source(cfg.model.model)), cfg.model.chat_template, cfg.model.model
    )


def check_gpus(gpus_per_client: float, *, cluster: bool = False) -> None:
    """Refuse a GPU share per simulated client that this machine (or any machine) cannot give.

    ``cluster``: the simulation runs on a Ray cluster, whose GPUs Ray counts; only the
    value itself is checked here.

    Raises
    ------
    ConfigError
        Naming ``gpus-per-client``, what it got, and the GPUs there are.

    """
    if not 0 <= gpus_per_client <= 64:
        raise ConfigError(f"gpus-per-client: must be a number in [0, 64], got {gpus_per_client!r}")
    if gpus_per_client == 0 or cluster:
        return
    import torch  # noqa: PLC0415 - heavy: torch, only when GPUs are asked for

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_client > count:
        raise ConfigError(
            f"gpus-per-client: {gpus_per_client:g} GPUs per client asked for, and this machine has {count} "
            f"CUDA GPU(s); use at most {count}" + (" (fractions share one GPU, e.g. 0.25)" if count else "")
        )


def refuse_finished_run(out_dir: Path) -> None:
    """Refuse to start a new run in ``out_dir`` when that would lose an earlier one.

    Raises
    ------
    ConfigError
        If ``out_dir`` holds a finished run (``summary.json``) or a resumable one (a checkpoint).

    """
    held = held_run(out_dir)
    if held == "finished":
        raise ConfigError(
            f"out: {out_dir} holds a finished run; choose another folder, pass --overwrite "
            "(overwrite=True) to replace it, or `fedlora resume` to add rounds"
        )
    if held == "unfinished":
        raise ConfigError(
            f"out: {out_dir} holds an unfinished run; go on with `fedlora resume {out_dir}`, or pass "
            "--overwrite (overwrite=True) to start afresh"
        )
