"""Every key that crosses the wire between ServerApp and ClientApp, in one place."""

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
    "M_CANARY_GLOBAL",
    "M_CANARY_PERSONALIZED",
    "M_PERSONAL_STEPS",
    "C_SERVER_ROUND",
    "C_LOCAL_STEPS",
    "C_PROXIMAL_MU",
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
# Final round, on the client holding the canary (causal LMs): its exposure in bits.
M_CANARY_GLOBAL = "canary-exposure-global"
M_CANARY_PERSONALIZED = "canary-exposure-personalized"
# Client-level DP: every client weighs the same in the mean (Flower's accountant requires it).
M_UNIT_WEIGHT = "unit-weight"
