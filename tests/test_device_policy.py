"""A device's own policy: what a run config may make it load, its privacy floor and work caps."""

import logging
import os
import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args
from helpers import as_server

import fedlora.client.recipe
import fedlora.client.setup
from fedlora.cli import _parser
from fedlora.cli.deploy import _policy
from fedlora.client.policy import DevicePolicy, PolicyRefused, RunRequest, allowed_model_entry
from fedlora.client.state import save_state, state_path
from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError
from fedlora.deploy import node_config
from fedlora.deploy.commands import private_folder
from fedlora.lora.adapters import to_record
from fedlora.models import build_model
from fedlora.privacy import PrivacyLedger

# ---------------------------------------------------------------------------
# The policy itself: hand-computed refusals
# ---------------------------------------------------------------------------


def test_no_policy_limits_nothing():
    # Prepare: a request asking for much, with DP off.
    request = RunRequest("tiny-bert", local_steps=10_000, num_threads=0, max_length=512, eval_examples=0)

    # Execute / Assert
    assert DevicePolicy().violations(request) == []
    assert DevicePolicy().to_node_config() == {}


def test_a_noise_multiplier_below_the_floor_is_refused():
    # Prepare
    policy = DevicePolicy(min_noise_multiplier=1.0)

    # Execute
    low = policy.violations(RunRequest("tiny-bert", dp=True, noise_multiplier=0.5))
    calibrated = policy.violations(
        RunRequest("tiny-bert", dp=True, noise_multiplier=0.61234, calibrated=True, target_epsilon=20)
    )
    at_floor = policy.violations(RunRequest("tiny-bert", dp=True, noise_multiplier=1.0))

    # Assert
    assert low == ["dp-noise-multiplier 0.5 is below this device's floor 1 (--min-noise-multiplier)"]
    assert calibrated == [
        "dp-noise-multiplier 0.6123 (calibrated from dp-target-epsilon 20) is below this device's floor 1 "
        "(--min-noise-multiplier)"
    ]
    assert at_floor == []


@pytest.mark.parametrize(
    ("policy", "flags"),
    [
        (DevicePolicy(require_dp=True), "--require-dp"),
        (DevicePolicy(min_noise_multiplier=0.8), "--min-noise-multiplier 0.8"),
        (DevicePolicy(max_epsilon=8), "--max-epsilon 8"),
        (DevicePolicy(max_lifetime_epsilon=20, require_dp=True), "--require-dp, --max-lifetime-epsilon 20"),
    ],
)
def test_dp_off_is_refused_where_any_privacy_limit_is_set(policy, flags):
    # Execute
    found = policy.violations(RunRequest("tiny-bert", dp=False))

    # Assert: the one reason, naming what requires DP-SGD.
    assert found == [f"DP-SGD is off; this device requires it ({flags})"]


def test_a_run_budget_target_or_delta_over_the_device_s_caps_is_refused():
    # Prepare
    policy = DevicePolicy(max_epsilon=8)
    base = {"dp": True, "noise_multiplier": 1.0}

    # Execute
    no_budget = policy.violations(RunRequest("tiny-bert", **base))
    over = policy.violations(
        RunRequest("tiny-bert", **base, epsilon_budget=9, target_epsilon=10, calibrated=True, delta=1e-3)
    )
    within = policy.violations(RunRequest("tiny-bert", **base, epsilon_budget=8, target_epsilon=8))

    # Assert: a run must set a budget; each field over its cap is named with both values.
    assert no_budget == ["dp-epsilon-budget inf is over this device's 8 (--max-epsilon)"]
    assert over == [
        "dp-delta 0.001 is over this device's 1e-05 (--max-delta)",
        "dp-epsilon-budget 9 is over this device's 8 (--max-epsilon)",
        "dp-target-epsilon 10 is over this device's 8 (--max-epsilon)",
    ]
    assert within == []


def test_the_lifetime_cap_is_the_other_runs_sum_plus_this_run_s_budget():
    # Prepare: earlier runs spent 7 in all; the device allows 10 over its lifetime.
    policy = DevicePolicy(max_lifetime_epsilon=10)
    run = {"dp": True, "noise_multiplier": 1.0, "spent_elsewhere": 7.0}

    # Execute
    fits = policy.violations(RunRequest("tiny-bert", **run, epsilon_budget=3))
    over = policy.violations(RunRequest("tiny-bert", **run, epsilon_budget=4, spent_here=1))
    spent_past_budget = policy.violations(RunRequest("tiny-bert", **run, epsilon_budget=2, spent_here=5))

    # Assert: 7 + 3 = 10 fits; 7 + max(1, 4) = 11 and 7 + max(5, 2) = 12 do not.
    assert fits == []
    assert over == [
        "dp-epsilon-budget 4 would bring this device's lifetime epsilon to 11 (its other runs 7 + this "
        "run 4), over its 10 (--max-lifetime-epsilon)"
    ]
    assert spent_past_budget == [
        "dp-epsilon-budget 2 would bring this device's lifetime epsilon to 12 (its other runs 7 + this "
        "run 5), over its 10 (--max-lifetime-epsilon)"
    ]


def test_work_over_the_device_s_caps_is_refused_naming_each_field(monkeypatch):
    # Prepare
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    policy = DevicePolicy(max_steps=5, max_threads=2, max_length=64, max_eval_examples=16)
    request = RunRequest(
        "tiny-bert",
        local_steps=6,
        personal_steps=5,
        num_threads=0,
        max_length=128,
        eval_examples=0,
        audit_examples=20,
    )

    # Execute
    found = policy.violations(request)
    within = policy.violations(
        RunRequest(
            "tiny-bert", local_steps=5, personal_steps=5, num_threads=2, max_length=64, eval_examples=16
        )
    )

    # Assert
    assert found == [
        "local-steps 6 is over this device's 5 (--max-steps)",
        "max-length 128 is over this device's 64 (--max-length)",
        "audit-examples 20 is over this device's 16 (--max-eval-examples)",
        "num-threads 0 (torch's default: 8 cores) is over this device's 2 (--max-threads)",
        "eval-examples 0 (every held-out example) is over this device's 16 (--max-eval-examples)",
    ]
    assert within == []


def test_check_raises_one_line_the_server_may_read_whole():
    # Prepare
    policy = DevicePolicy(max_steps=2)

    # Execute
    with pytest.raises(PolicyRefused) as refused:
        policy.check(RunRequest("gpt2", local_steps=3))

    # Assert
    message = (
        "policy: model 'gpt2' is not allowed on this device (bundled models or --allow-model); "
        "local-steps 3 is over this device's 2 (--max-steps)"
    )
    assert str(refused.value) == message
    assert refused.value.public() == f"PolicyRefused: {message}"


def test_a_run_request_is_what_the_run_config_asks():
    # Prepare
    cfg = RunConfig.from_flat(
        {
            "model": "tiny-bert",
            "dp-target-epsilon": 4.0,
            "dp-epsilon-budget": 5.0,
            "dp-delta": 1e-6,
            "local-steps": 7,
            "personal-steps": 2,
            "num-threads": 3,
            "max-length": 24,
            "eval-examples": 10,
            "audit-examples": 6,
        }
    )

    # Execute
    request = RunRequest.of(cfg, noise_multiplier=1.3, spent_here=0.5, spent_elsewhere=2.0)

    # Assert
    assert request == RunRequest(
        "tiny-bert",
        dp=True,
        noise_multiplier=1.3,
        calibrated=True,
        target_epsilon=4.0,
        epsilon_budget=5.0,
        delta=1e-6,
        local_steps=7,
        personal_steps=2,
        num_threads=3,
        max_length=24,
        eval_examples=10,
        audit_examples=6,
        spent_here=0.5,
        spent_elsewhere=2.0,
    )
    assert RunRequest.of(RunConfig(), noise_multiplier=0.7).noise_multiplier == 0.0  # DP off


# ---------------------------------------------------------------------------
# Models a run may name
# ---------------------------------------------------------------------------


def test_a_run_names_only_bundled_or_allowed_models(tmp_path, monkeypatch):
    # Prepare: the owner allowed one folder and one hub id; HOME is tmp_path.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "other").mkdir()
    policy = DevicePolicy(allowed_models=(str(tmp_path / "mine"), "org/model"))

    # Execute / Assert
    for name in ("tiny-bert", "minilm", "smollm2", "org/model", str(tmp_path / "mine"), "~/mine", "mine"):
        assert policy.allows_model(name), name
    assert policy.allows_model(f"{tmp_path}/other/../mine")
    for name in ("gpt2", "org/other", "./org/model", "~/other", str(tmp_path / "other"), "/", "a\0b"):
        assert not policy.allows_model(name), name
    assert not DevicePolicy().allows_model("~/mine")


def test_allow_model_keeps_a_folder_absolute_and_a_hub_id_as_written(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "file").write_text("")

    # Execute / Assert
    assert allowed_model_entry("~/m") == str(tmp_path / "m")
    assert allowed_model_entry("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ConfigError, match=r"^allow-model: ~/missing is not a folder$"):
        allowed_model_entry("~/missing")
    with pytest.raises(ConfigError, match=r"^allow-model: .*file is not a folder$"):
        allowed_model_entry(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"^allow-model: a model folder or a hub id"):
        allowed_model_entry("two words")


# ---------------------------------------------------------------------------
# Node config and `fedlora client` flags
# ---------------------------------------------------------------------------


def _every_limit(tmp_path: Path) -> DevicePolicy:
    (tmp_path / "my model").mkdir(exist_ok=True)
    return DevicePolicy(
        allowed_models=(str(tmp_path / "my model"), "org/model"),
        min_noise_multiplier=0.8,
        max_epsilon=8.0,
        max_lifetime_epsilon=30.5,
        max_delta=1e-6,
        require_dp=True,
        max_steps=5,
        max_threads=2,
        max_length=64,
        max_eval_examples=16,
    )


def test_a_policy_survives_the_node_config_string_flower_parses(tmp_path):
    # Prepare
    policy = _every_limit(tmp_path)

    # Execute: as `fedlora client` writes it and flower-supernode reads it.
    text = node_config(tmp_path, state_dir=tmp_path / "state", policy=policy)
    parsed = parse_config_args([text])

    # Assert: every key, and the same policy back.
    assert set(policy.to_node_config()) == set(keys.NODE_POLICY)
    assert DevicePolicy.from_node_config(parsed) == policy
    assert parsed[keys.NODE_ALLOWED_MODELS] == f"{tmp_path / 'my model'}\norg/model"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"min-noise-multiplier": "high"}, "min-noise-multiplier: must be a number, got 'high'"),
        ({"min-noise-multiplier": -1.0}, "min-noise-multiplier: must be a number >= 0, got -1.0"),
        ({"max-epsilon": 0.0}, "max-epsilon: must be a number > 0, got 0.0"),
        ({"max-delta": 1.0}, "max-delta: must be a number in (0, 1), got 1.0"),
        ({"max-steps": -1}, "max-steps: must be an integer >= 0 (0: no cap), got -1"),
        ({"max-threads": 1.5}, "max-threads: must be an integer >= 0 (0: no cap), got 1.5"),
        ({"require-dp": 1}, "require-dp: must be true or false, got 1"),
        ({"allowed-models": 3}, "allowed-models: must be a string of lines, got 3"),
    ],
)
def test_a_bad_policy_value_is_refused_naming_its_key(node, message):
    with pytest.raises(ConfigError) as err:
        DevicePolicy.from_node_config(node)
    assert str(err.value) == message


def test_fedlora_client_flags_build_the_policy(tmp_path):
    # Prepare
    policy = _every_limit(tmp_path)
    argv = ["client", "--superlink", "x:1", "--data", str(tmp_path)]
    argv += ["--allow-model", str(tmp_path / "my model"), "--allow-model", "org/model", "--require-dp"]
    argv += ["--min-noise-multiplier", "0.8", "--max-epsilon", "8", "--max-lifetime-epsilon", "30.5"]
    argv += ["--max-delta", "1e-6", "--max-steps", "5", "--max-threads", "2", "--max-length", "64"]
    argv += ["--max-eval-examples", "16"]

    # Execute
    built = _policy(_parser().parse_args(argv))
    default = _policy(_parser().parse_args(argv[:5]))

    # Assert
    assert built == policy
    assert default == DevicePolicy()
    with pytest.raises(
        ConfigError, match=r"^max-threads: profile 'pi' runs 4 torch threads, over --max-threads 2"
    ):
        _policy(_parser().parse_args([*argv[:5], "--profile", "pi", "--max-threads", "2"]))


def test_the_state_folder_is_made_private_and_a_loose_one_tightened(tmp_path):
    # Prepare
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)

    # Execute
    new = private_folder(tmp_path / "a" / "state")
    tightened = private_folder(loose)
    again = private_folder(loose)

    # Assert
    assert new is None and stat.S_IMODE((tmp_path / "a" / "state").stat().st_mode) == 0o700
    assert tightened == f"{loose} was mode 0755; made it 0700 (its owner only)"
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700 and again is None


# ---------------------------------------------------------------------------
# A device's ClientApp: refused runs answer an error, run nothing, write nothing
# ---------------------------------------------------------------------------


@pytest.fixture
def cfg(tiny_cfg, jsonl_dir):
    return tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport")


def _device(cfg: RunConfig, tmp_path: Path, jsonl_dir: Path, **policy: object) -> Context:
    node = {"data-dir": str(jsonl_dir), "state-dir": str(tmp_path / "state"), "partition-id": 0}
    return Context(
        run_id=7,
        node_id=1,
        state=RecordDict(),
        run_config=cfg.to_flat(),
        node_config={**node, "num-partitions": 3, **policy},
    )


def _train(arrays: ArrayRecord | None = None) -> Message:
    as_server()
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.fixture
def global_arrays(cfg):
    return to_record(build_model(cfg.model, 3, seed=0).initial_global)


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a model is loaded or a training step taken."""

    def fail(*args, **kwargs):
        raise AssertionError("a refused run loaded a model or trained")

    monkeypatch.setattr(fedlora.client.setup, "cached_model", fail)
    monkeypatch.setattr(fedlora.client.recipe, "train_shared", fail)


def test_a_device_refuses_a_model_it_did_not_allow_before_loading_anything(
    cfg, tmp_path, jsonl_dir, caplog, nothing_runs
):
    # Prepare: the run names a folder of the device owner's home.
    context = _device(cfg.replace(model="~/mymodel"), tmp_path, jsonl_dir)

    # Execute
    with caplog.at_level(logging.ERROR):
        reply = app(_train(), context)

    # Assert: the policy's code and reason; a log line; no state folder made.
    assert reply.has_error() and reply.error.code == keys.E_POLICY
    reason = "policy: model '~/mymodel' is not allowed on this device (bundled models or --allow-model)"
    assert reply.error.reason == f"PolicyRefused: {reason}"
    assert f"fedlora client 0: refused run 7: {reason}; nothing of it ran" in caplog.text
    assert not (tmp_path / "state").exists()


def test_a_device_refuses_less_noise_than_its_floor_and_keeps_its_state_as_it_was(
    cfg, tmp_path, jsonl_dir, monkeypatch, global_arrays
):
    # Prepare: a run within the floor trains once and leaves the device's state.
    floor = {keys.NODE_MIN_NOISE_MULTIPLIER: 1.0}
    accepted = app(
        _train(global_arrays), _device(cfg.replace(dp_noise_multiplier=1.0), tmp_path, jsonl_dir, **floor)
    )
    assert not accepted.has_error(), accepted.error
    before = _tree(tmp_path / "state")
    assert before
    steps = []
    monkeypatch.setattr(fedlora.client.recipe, "train_shared", lambda *a, **k: steps.append(1))

    # Execute: the same run with less noise, then a DP-off one.
    low = app(
        _train(global_arrays), _device(cfg.replace(dp_noise_multiplier=0.5), tmp_path, jsonl_dir, **floor)
    )
    off = app(_train(global_arrays), _device(cfg, tmp_path, jsonl_dir, **floor))

    # Assert
    assert (low.error.code, low.error.reason) == (
        keys.E_POLICY,
        "PolicyRefused: policy: dp-noise-multiplier 0.5 is below this device's floor 1 "
        "(--min-noise-multiplier)",
    )
    assert (off.error.code, off.error.reason) == (
        keys.E_POLICY,
        "PolicyRefused: policy: DP-SGD is off; this device requires it (--min-noise-multiplier 1)",
    )
    assert steps == [] and _tree(tmp_path / "state") == before


def test_a_device_refuses_a_noise_calibrated_below_its_floor(cfg, tmp_path, jsonl_dir, nothing_runs):
    # Prepare: a large target epsilon calibrates a small noise multiplier for this device's
    # 16 training examples (batches of 8) over 1 round of 2 + 1 DP-SGD steps.
    run = cfg.replace(dp_target_epsilon=20.0, num_server_rounds=1)

    # Execute
    reply = app(_train(), _device(run, tmp_path, jsonl_dir, **{keys.NODE_MIN_NOISE_MULTIPLIER: 1.0}))

    # Assert: the noise multiplier DP-SGD would have used (the client's cached calibration: the same).
    expected = fedlora.client.setup._noise(run.privacy, 8 / 16, 1 * (2 + 1))
    assert expected < 1
    assert reply.error.code == keys.E_POLICY
    assert reply.error.reason == (
        f"PolicyRefused: policy: dp-noise-multiplier {expected:.4g} (calibrated from dp-target-epsilon 20) "
        "is below this device's floor 1 (--min-noise-multiplier)"
    )


def test_a_device_counts_its_earlier_runs_against_its_lifetime_epsilon(
    cfg, tmp_path, jsonl_dir, global_arrays
):
    # Prepare: an earlier federation's ledger in the device's state folder.
    ledger = PrivacyLedger("rdp", [(1.0, 0.5, 40)])
    earlier = ledger.epsilon(1e-5)
    saved = Context(1, 1, {}, RecordDict({keys.S_LEDGER: ledger.to_record()}), {})
    save_state(saved, tmp_path / "state" / "federation-earlier" / "client-0.state")
    lifetime = {keys.NODE_MAX_LIFETIME_EPSILON: earlier + 100}
    run = cfg.replace(dp_noise_multiplier=1.0)

    # Execute
    over = app(_train(), _device(run.replace(dp_epsilon_budget=101.0), tmp_path, jsonl_dir, **lifetime))
    within = app(
        _train(global_arrays), _device(run.replace(dp_epsilon_budget=100.0), tmp_path, jsonl_dir, **lifetime)
    )

    # Assert
    assert over.error.code == keys.E_POLICY
    assert over.error.reason == (
        f"PolicyRefused: policy: dp-epsilon-budget 101 would bring this device's lifetime epsilon to "
        f"{earlier + 101:.4g} (its other runs {earlier:.4g} + this run 101), over its {earlier + 100:g} "
        "(--max-lifetime-epsilon)"
    )
    assert not within.has_error(), within.error


def test_an_unreadable_earlier_state_refuses_the_run_without_its_path(
    cfg, tmp_path, jsonl_dir, caplog, nothing_runs
):
    # Prepare
    broken = tmp_path / "state" / "federation-earlier" / "client-0.state"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff not a state")
    run = cfg.replace(dp_noise_multiplier=1.0, dp_epsilon_budget=1.0)

    # Execute
    with caplog.at_level(logging.ERROR):
        reply = app(_train(), _device(run, tmp_path, jsonl_dir, **{keys.NODE_MAX_LIFETIME_EPSILON: 10.0}))

    # Assert: the reason names the policy; the path is in the device's log only.
    assert reply.error.code == keys.E_POLICY
    assert "an earlier run's state on this device cannot be read" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and str(broken) in caplog.text


def test_a_device_refuses_more_steps_than_it_allows(cfg, tmp_path, jsonl_dir, nothing_runs):
    # Execute
    reply = app(
        _train(), _device(cfg.replace(local_steps=10), tmp_path, jsonl_dir, **{keys.NODE_MAX_STEPS: 5})
    )

    # Assert
    assert (reply.error.code, reply.error.reason) == (
        keys.E_POLICY,
        "PolicyRefused: policy: local-steps 10 is over this device's 5 (--max-steps)",
    )
    assert not (tmp_path / "state").exists()


def test_a_simulated_client_has_no_device_policy(cfg, global_arrays):
    # Prepare: a node without its own data-dir, whatever its node config holds.
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config=cfg.to_flat(),
        node_config={"partition-id": 0, "num-partitions": 3, keys.NODE_MIN_NOISE_MULTIPLIER: 5.0},
    )

    # Execute
    reply = app(_train(global_arrays), context)

    # Assert: DP off, trained all the same.
    assert not reply.has_error(), reply.error
    assert reply.content.metric_records[keys.METRICS][keys.M_TRAIN_STEPS] == 2


def test_a_corrupt_state_file_s_error_reply_carries_no_path(cfg, tmp_path, jsonl_dir, caplog):
    # Prepare: this federation's state file is corrupt.
    context = _device(cfg, tmp_path, jsonl_dir)
    path = state_path(context)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff not a state")

    # Execute
    with caplog.at_level(logging.ERROR):
        reply = app(_train(), context)

    # Assert
    assert (reply.error.code, reply.error.reason) == (keys.E_STATE, "FedloraError: state-dir")
    assert str(path) in caplog.text
