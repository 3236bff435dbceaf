"""A simulation on an existing two-node Ray cluster, started here on this machine."""

from __future__ import annotations

import math

import pytest
from helpers import TINY_FEDERATION

import fedlora
from fedlora.core.errors import ConfigError
from fedlora.launch import check_gpus


@pytest.mark.federation
def test_a_simulation_runs_on_a_two_node_ray_cluster(tmp_path):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    # The head has no CPU for tasks: every ClientApp runs on the second node. (Ray's own rule:
    # a simulation on the machine that started a cluster joins it even without RAY_ADDRESS;
    # --ray-address is what reaches a cluster elsewhere.)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        result = fedlora.run(**TINY_FEDERATION, rounds=2, out=tmp_path / "run", ray_address=cluster.address)
        import ray

        ray.init(address=cluster.address)
        # The cluster's job table: this test's connection, and the simulation's driver before it.
        drivers = [str(job.get("Entrypoint", "")) for job in ray._private.state.jobs()]
        ray.shutdown()
    finally:
        cluster.shutdown()
    assert any("flwr" in entrypoint or "flower" in entrypoint for entrypoint in drivers), drivers
    assert [r["round"] for r in result.summary["rounds"]] == [1, 2]
    assert all(
        math.isfinite(result.summary["final"][k]) for k in ("global_accuracy", "personalized_accuracy")
    )
    assert len(result.summary["per_client"]["final_round"]) == TINY_FEDERATION["clients"]


def test_more_gpus_per_client_than_the_machine_has_is_one_line():
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(
        ConfigError,
        match=f"gpus-per-client: {count + 1:g} GPUs per client asked for, and this machine has {count}",
    ):
        check_gpus(count + 1)
    with pytest.raises(ConfigError, match=r"gpus-per-client: must be a number in \[0, 64\]"):
        check_gpus(-0.5)
    check_gpus(count + 1, cluster=True)  # a Ray cluster counts its own GPUs
    check_gpus(0)


def test_the_command_line_refuses_gpus_it_does_not_have_before_flower_starts(capsys, jsonl_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from fedlora import cli

    code = cli.main(
        ["simulate", "--data", str(jsonl_dir), "--gpus-per-client", "0.5", "--run-config", "model=tiny-bert"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        "gpus-per-client: 0.5 GPUs per client asked for, and this machine has 0 CUDA GPU(s); use at most 0"
    )
    assert code == 2 and err == [f"fedlora: error: {expected}"]


@pytest.mark.parametrize("address", ["head", "10.0.0.5", "10.0.0.5:port", "x:6379; rm -rf /"])
def test_a_ray_address_that_is_not_one_is_one_line_before_anything_starts(tmp_path, address, jsonl_dir):
    from fedlora.config import RunConfig
    from fedlora.launch import simulate

    cfg = RunConfig.from_flat({"model": "tiny-bert", "data-dir": str(jsonl_dir)})
    with pytest.raises(ConfigError, match="ray-address: must be auto or HOST:PORT"):
        simulate(cfg, num_clients=3, out_dir=tmp_path / "run", ray_address=address)
    assert not (tmp_path / "run").exists()


def test_a_session_on_a_ray_cluster_points_flower_s_ray_at_it(tmp_path):
    from fedlora.launch import FlowerSession

    assert FlowerSession(tmp_path, ray_address="10.0.0.5:6379").env()["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ADDRESS" not in FlowerSession(tmp_path).env()
