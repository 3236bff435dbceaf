"""Every key that crosses the wire, names a node-config entry or a state record, and every reply code."""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "CONFIG",
    "LOCAL_ONLY_ACTION",
    "METRICS",
    "M_ACCURACY_GLOBAL",
    "M_ACCURACY_LOCAL_ONLY",
    "M_LOSS_LOCAL_ONLY",
    "M_ACCURACY_PERSONALIZED",
    "M_LOSS_GLOBAL",
    "M_LOSS_PERSONALIZED",
    "M_NUM_EXAMPLES",
    "M_PARTITION_ID",
    "M_TRAIN_LOSS",
    "M_TRAIN_STEPS",
    "M_TRAIN_WALL_S",
    "M_PERSONAL_LOSS",
    "M_PERSONAL_ROUNDS",
    "M_EPSILON",
    "M_BUDGET_EXHAUSTED",
    "M_UNIT_WEIGHT",
    "M_MIA_GLOBAL",
    "M_MIA_PERSONALIZED",
    "M_MIA_CHANCE",
    "M_MIA_EXAMPLES",
    "M_CANARY_GLOBAL",
    "M_GAIN_GLOBAL",
    "M_GAIN_GLOBAL_SE",
    "M_GAIN_LOCAL_ONLY",
    "M_GAIN_LOCAL_ONLY_SE",
    "M_MIX_WEIGHT",
    "M_CANARY_PERSONALIZED",
    "M_PERSONAL_STEPS",
    "C_SERVER_ROUND",
    "C_LOCAL_STEPS",
    "C_PROXIMAL_MU",
    "NODE_DATA_DIR",
    "NODE_DEVICE",
    "NODE_LORA_RANK",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "NODE_PROFILE",
    "NODE_STATE_DIR",
    "NODE_WIRE_LOG",
    "NODE_IDENTITY",
    "NODE_ALLOWED_MODELS",
    "NODE_MIN_NOISE_MULTIPLIER",
    "NODE_MAX_EPSILON",
    "NODE_MAX_LIFETIME_EPSILON",
    "NODE_MAX_DELTA",
    "NODE_REQUIRE_DP",
    "NODE_MAX_STEPS",
    "NODE_MAX_THREADS",
    "NODE_MAX_LENGTH",
    "NODE_MAX_EVAL_EXAMPLES",
    "NODE_POLICY",
    "STATE_PREFIX",
    "S_PERSONAL",
    "S_KEPT",
    "S_LEDGER",
    "S_DECLINED",
    "S_PERSONAL_ROUNDS",
    "S_FINAL_SCORES",
    "S_LOCAL_ONLY_SCORES",
    "S_LAST_GLOBAL",
    "S_CLIENT_CONFIG",
    "E_CLIENT_INPUT",
    "E_BUDGET_EXHAUSTED",
    "E_STATE",
    "E_POLICY",
]

# Record names inside a Message's RecordDict (Flower's FedAvg defaults).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Message action for the once-per-run local-only baseline: message type "train.local-only".
LOCAL_ONLY_ACTION = "local_only"

# ConfigRecord keys (server -> client).
C_SERVER_ROUND = "server-round"
C_LOCAL_STEPS = "local-steps"
C_PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

# MetricRecord keys (client -> server). All values are scalars.
M_NUM_EXAMPLES = "num-examples"
M_PARTITION_ID = "partition-id"
M_TRAIN_LOSS = "train-loss"
M_TRAIN_STEPS = "train-steps"
M_TRAIN_WALL_S = "train-wall-s"
M_PERSONAL_STEPS = "personal-steps"
M_PERSONAL_LOSS = "personal-loss"
M_PERSONAL_ROUNDS = "personal-rounds"
M_ACCURACY_GLOBAL = "accuracy-global"
M_ACCURACY_PERSONALIZED = "accuracy-personalized"
M_ACCURACY_LOCAL_ONLY = "accuracy-local-only"
M_LOSS_LOCAL_ONLY = "loss-local-only"
M_LOSS_GLOBAL = "loss-global"
M_LOSS_PERSONALIZED = "loss-personalized"
M_EPSILON = "epsilon"  # DP: epsilon this client has spent so far, at the run's delta
M_BUDGET_EXHAUSTED = "budget-exhausted"  # DP: 1 when the next round would exceed the budget
# Final round: the loss-threshold membership-inference advantage against each model.
M_MIA_GLOBAL = "mia-advantage-global"
M_MIA_PERSONALIZED = "mia-advantage-personalized"
M_MIA_CHANCE = "mia-advantage-chance"  # what the attack shows without leakage, for these sample sizes
M_MIA_EXAMPLES = "mia-examples"  # training plus held-out examples the audit compared
# Final round, on the client holding the canary (causal LMs): its exposure in bits.
M_CANARY_GLOBAL = "canary-exposure-global"
M_CANARY_PERSONALIZED = "canary-exposure-personalized"
# Evaluated rounds: the personalized model's mean paired per-example gain over the global one
# (accuracy; causal LMs: loss, global minus personalized) and its standard error; the
# local-only reply: the same over the local-only model (final round's personalized model).
M_GAIN_GLOBAL = "gain-over-global"
M_GAIN_GLOBAL_SE = "gain-over-global-se"
M_GAIN_LOCAL_ONLY = "gain-over-local-only"
M_GAIN_LOCAL_ONLY_SE = "gain-over-local-only-se"
# ``personal-mix=validation``: the weight of the personalized model in the client's mixture.
M_MIX_WEIGHT = "mix-weight"
# Client-level DP: every client weighs the same in the mean (Flower's accountant requires it).
M_UNIT_WEIGHT = "unit-weight"

# Node config (a device owner's ``--node-config``, or Flower's simulation engine).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"  # a device's own data folder: wins over the run config's
NODE_STATE_DIR = "state-dir"  # where a device keeps its state between messages and restarts
NODE_PROFILE = "profile"  # a device profile (fedlora.client.profiles)
NODE_LORA_RANK = "lora-rank"  # a node's own LoRA rank, where the strategy takes mixed ranks
NODE_DEVICE = "device"  # where a node computes (cpu, cuda, cuda:N, mps, auto): wins over the run config's
NODE_WIRE_LOG = "audit-wire-log"  # a device's own wire log (the run config's is ignored there)
# Node-config keys that make a node's state belong to a different federation.
NODE_IDENTITY = (NODE_PROFILE, NODE_LORA_RANK, NODE_DATA_DIR)
# A device owner's policy (fedlora.client.policy): what a run config may make the device load,
# its privacy floor and its work caps. Not identity: a changed policy keeps the device's ledgers.
NODE_ALLOWED_MODELS = "allowed-models"  # newline-separated folders or hub ids beside the bundled models
NODE_MIN_NOISE_MULTIPLIER = "min-noise-multiplier"
NODE_MAX_EPSILON = "max-epsilon"  # per run
NODE_MAX_LIFETIME_EPSILON = "max-lifetime-epsilon"  # over every run in the device's state folder
NODE_MAX_DELTA = "max-delta"  # the largest dp-delta at which the epsilon caps are read
NODE_REQUIRE_DP = "require-dp"
NODE_MAX_STEPS = "max-steps"  # local-steps and personal-steps per round
NODE_MAX_THREADS = "max-threads"
NODE_MAX_LENGTH = "max-length"
NODE_MAX_EVAL_EXAMPLES = "max-eval-examples"  # eval-examples and audit-examples
NODE_POLICY = (
    NODE_ALLOWED_MODELS,
    NODE_MIN_NOISE_MULTIPLIER,
    NODE_MAX_EPSILON,
    NODE_MAX_LIFETIME_EPSILON,
    NODE_MAX_DELTA,
    NODE_REQUIRE_DP,
    NODE_MAX_STEPS,
    NODE_MAX_THREADS,
    NODE_MAX_LENGTH,
    NODE_MAX_EVAL_EXAMPLES,
)

# Records fedlora keeps in a client's ``context.state`` (and on its disk): all share a prefix.
STATE_PREFIX = "fedlora-"
S_PERSONAL = "fedlora-personal-adapter"  # the personalization method's state; never sent
S_KEPT = "fedlora-kept-parts"  # adapter parts a strategy keeps on the client (FedSA-LoRA's B)
S_LEDGER = "fedlora-privacy-ledger"  # every DP-SGD step taken
S_DECLINED = "fedlora-budget-declined"  # set once the client declined a round for its budget
S_PERSONAL_ROUNDS = "fedlora-personal-rounds"  # rounds the personal state has been trained
S_FINAL_SCORES = "fedlora-final-scores"  # the final personalized model's per-example held-out scores
S_LOCAL_ONLY_SCORES = "fedlora-local-only-scores"  # the local-only model's, the same way
# What `fedlora export` rebuilds the personalized model from: the server's last arrays and
# this client's effective configuration (run config, node's data, profile and rank).
S_LAST_GLOBAL = "fedlora-last-global"
S_CLIENT_CONFIG = "fedlora-client-config"

# Error codes of client replies that report a problem instead of crashing the node.
E_CLIENT_INPUT = 4100  # bad local input: config, data, model
E_BUDGET_EXHAUSTED = 4101  # training declined: the epsilon budget would be exceeded
E_STATE = 4102  # the node's state file cannot be read
E_POLICY = 4103  # the run asks for less privacy or more work than the device's own policy allows
