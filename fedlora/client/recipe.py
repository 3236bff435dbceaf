"""The client's round, as one recipe read top to bottom: train, evaluate, local-only.

Each function handles one kind of message from the server. ``train`` reads the global
adapter at this client's rank, trains the shared adapter (DP-SGD when configured) and
replies with only the parts its strategy shares (`fedlora.lora.protocol.sent_parts`,
encoded by `fedlora.lora.adapters.to_record`: nothing else leaves the client).
``evaluate`` updates the personal state against the new global adapter, measures the
global and the personalized model on the held-out split and, in the final round, runs
the privacy audits. ``local_only`` is the once-per-run baseline of an adapter trained
alone. Personal state stays in ``context.state`` (on the node's disk between messages).
"""

from __future__ import annotations

import dataclasses
import math

from flwr.app import ConfigRecord, Context, Message

from fedlora.client.audit import final_audit
from fedlora.client.measure import gain, measure, scores
from fedlora.client.messages import legacy_reply, reply
from fedlora.client.setup import Client
from fedlora.core import keys
from fedlora.lora.adapters import to_record
from fedlora.lora.protocol import sent_parts
from fedlora.train.local import local_only as train_local_only
from fedlora.train.local import train_shared

__all__ = ["evaluate", "local_only", "train"]


def train(message: Message, context: Context) -> Message:
    """Train the shared adapter on local data; send back only the parts the strategy shares."""
    client = Client(context)
    incoming = client.incoming(message)
    server_round = incoming.int(keys.C_SERVER_ROUND)
    view = client.view(incoming)
    mu = incoming.float(keys.C_PROXIMAL_MU) if client.protocol.proximal else 0.0
    dp = client.dp()
    if dp is not None:
        # A round is the shared and the personal steps: start it only if both fit in the budget.
        client.check_budget(client.dp_steps_per_round(), dp)
    seed, progress = client.seed(server_round), (server_round, client.cfg.federation.num_server_rounds)
    local = client.local(view, seed, dp, server_round, personal=False)
    own = client.method.train_round(local, client.personal())
    if own is not None:
        # The method trains its own adapter (FedALT: the individual LoRA) and keeps its state.
        state, result = own.sent, own.result
        client.state[keys.S_PERSONAL] = to_record(own.kept)
    else:
        state, result = train_shared(
            client.loaded,
            client.train,
            view.own_state,
            client.cfg.train,
            seed=seed,
            frozen=client.protocol.frozen,
            proximal_mu=mu,
            dp=dp,
            progress=progress,
        )
    client.spend(result.steps, dp)
    client.keep(state)
    metrics = {
        keys.M_NUM_EXAMPLES: client.data.num_train,
        **client.identity(),
        keys.M_TRAIN_LOSS: result.loss,
        keys.M_TRAIN_STEPS: result.steps,
        keys.M_TRAIN_WALL_S: result.wall_s,
        **client.privacy_metrics(dp),
        **client.weight(),
    }
    respond = legacy_reply if incoming.legacy else reply
    return respond(message, metrics, to_record(sent_parts(client.protocol, state)))


def evaluate(message: Message, context: Context) -> Message:
    """Update the personal state against the new global adapter, then evaluate both.

    The personalization method trains against the global adapter it will be combined
    with, so a better global adapter never leaves a stale personal one behind.
    """
    client = Client(context)
    incoming = client.incoming(message)
    server_round = incoming.int(keys.C_SERVER_ROUND)
    view = client.view(incoming)
    client.remember(incoming)
    dp = client.dp()
    seed = client.seed(server_round, 1)
    # With dp-personal off, the personal adapter (which never leaves the client) trains without DP.
    personal_dp = dp if client.cfg.privacy.dp_personal else None
    local = client.local(view, seed, personal_dp, server_round, personal=True)
    stored, result = client.personal(), None
    # A client that declined a round for its budget stops training altogether, personal
    # adapter included, and only evaluates; otherwise the personal steps complete its round.
    declined = dp is not None and client.declined()
    if not declined and (
        personal_dp is None or client.within_budget(client.cfg.train.personal_steps, personal_dp)
    ):
        stored, result = client.method.update(local, stored)
        client.spend(result.steps if result else 0, personal_dp)
    if stored is not None:
        client.state[keys.S_PERSONAL] = to_record(stored)
    personal_rounds = client.personal_rounds() + (result is not None)
    client.state[keys.S_PERSONAL_ROUNDS] = ConfigRecord({"rounds": personal_rounds})
    fed = client.cfg.federation
    measured: dict[str, float] = {}
    num_examples = len(client.test)
    if fed.evaluates(server_round):
        # Rounds before the last measure a sample of the held-out split (eval-examples).
        held_out = client.held_out(server_round)
        mix = client.cfg.train.personal_mix != "off"
        # A personalized model that is the global one is measured once.
        same = client.method.same_as_global(client.cfg.train)
        found = measure(
            client.method,
            dataclasses.replace(local, test=held_out),
            stored,
            mix=mix,
        )
        global_only, personalized = found.global_only, found.personalized
        final = server_round >= fed.num_server_rounds
        audit = final_audit(client, local, stored, global_only, personalized, same) if final else {}
        num_examples = global_only.num_examples
        causal = client.cfg.model.causal
        over_global = gain(personalized, global_only, causal)
        if final:
            # For the local-only baseline, run after the rounds: paired with the same examples.
            client.state[keys.S_FINAL_SCORES] = ConfigRecord({"scores": list(scores(personalized, causal))})
        measured = {
            keys.M_ACCURACY_GLOBAL: global_only.accuracy,
            keys.M_ACCURACY_PERSONALIZED: personalized.accuracy,
            keys.M_LOSS_GLOBAL: global_only.loss,
            keys.M_LOSS_PERSONALIZED: personalized.loss,
            keys.M_GAIN_GLOBAL: over_global.mean,
            keys.M_GAIN_GLOBAL_SE: over_global.se,
            **({keys.M_MIX_WEIGHT: found.weight} if found.weight is not None else {}),
            **audit,
        }
    metrics = {
        keys.M_NUM_EXAMPLES: num_examples,
        **client.identity(),
        **measured,
        keys.M_PERSONAL_STEPS: result.steps if result else 0,
        keys.M_PERSONAL_LOSS: result.loss if result else 0.0,
        keys.M_PERSONAL_ROUNDS: personal_rounds,
        **client.privacy_metrics(dp),
        **client.weight(),
    }
    if incoming.legacy:
        return legacy_reply(message, metrics, loss=measured.get(keys.M_LOSS_GLOBAL, math.nan))
    return reply(message, metrics)


def local_only(message: Message, context: Context) -> Message:
    """Baseline: train an adapter on this client's data alone; reply with its test accuracy only."""
    client = Client(context)
    steps = client.incoming(message).int(keys.C_LOCAL_STEPS)
    # A client alone trains on all its training examples, validation split included.
    result, ev = train_local_only(
        client.loaded, client.train, client.test, steps, client.cfg.train, seed=client.seed(0, 7)
    )
    local_scores = scores(ev, client.cfg.model.causal)
    # Kept for a sweep's runs of other methods, which pair their clients with this baseline.
    client.state[keys.S_LOCAL_ONLY_SCORES] = ConfigRecord({"scores": list(local_scores)})
    final = client.state.config_records.get(keys.S_FINAL_SCORES)
    personalized = tuple(float(x) for x in final["scores"]) if final else ()  # type: ignore[union-attr]
    over_local = gain(personalized, local_scores, client.cfg.model.causal)
    return reply(
        message,
        {
            keys.M_NUM_EXAMPLES: ev.num_examples,
            **client.identity(),
            keys.M_ACCURACY_LOCAL_ONLY: ev.accuracy,
            keys.M_LOSS_LOCAL_ONLY: ev.loss,
            keys.M_GAIN_LOCAL_ONLY: over_local.mean,
            keys.M_GAIN_LOCAL_ONLY_SE: over_local.se,
            keys.M_TRAIN_STEPS: result.steps,
            keys.M_TRAIN_WALL_S: result.wall_s,
        },
    )
