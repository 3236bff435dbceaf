"""Benchmark: bytes a client uploads per round with fedlora vs full fine-tuning of the same model.

Usage: python simulations/bench_upload.py [--run-config "model=minilm lora-rank=8"]
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
from flwr.app import Array, ArrayRecord

from fedlora.config import RunConfig
from fedlora.data.federated import resolve_labels
from fedlora.launch import parse_overrides
from fedlora.lora.adapters import to_record
from fedlora.models import build_model, load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(parse_overrides(args.run_config))
    labels = resolve_labels(cfg.data, cfg.model.task)
    loaded = build_model(cfg.model, len(labels))
    adapter = to_record(loaded.initial_global)
    base, _ = load_base(cfg.model, len(labels))
    # Full fine-tuning sends every weight of the model, encoded the same way.
    full = ArrayRecord(
        OrderedDict((k, Array(v.detach().float().numpy())) for k, v in base.state_dict().items())
    )
    n_adapter = sum(v.numel() for v in loaded.initial_global.values())
    n_full = sum(p.numel() for p in base.parameters())
    print(f"model: {cfg.model.model}  task: {cfg.model.task}  lora-rank: {cfg.model.lora_rank}")
    print(
        f"shared adapter: {n_adapter:,} parameters, {len(adapter)} tensors, {adapter.count_bytes():,} bytes"
    )
    print(f"full model:     {n_full:,} parameters, {len(full)} tensors, {full.count_bytes():,} bytes")
    print(f"upload reduction: {full.count_bytes() / adapter.count_bytes():.0f}x")


if __name__ == "__main__":
    main()
