"""FedDPA (Yang et al., NeurIPS 2024): dual adapters, mixed per input by its likeness to the client's data.

Training is `dual`'s: the global adapter is trained alone and shared; the personal one is
trained on top of the frozen global one and never leaves the client. At prediction, every
input ``x`` gets its own weight on the personal adapter (the paper's instance-wise
dynamic weighting)::

    t(x) = clamp(mean_i cos(e(x), e(x_i)), 0, 1)

over the client's own training inputs ``x_i``, where ``e`` is the last layer's hidden
state of the model with the personal adapter alone: at the last real token for a causal
LM (the reference code's default), averaged over the tokens for an encoder. Every adapted layer
computes ``W0 x + B_g A_g x + t(x) B_p A_p x`` and the head
``lerp(global head, personal head, t(x))``: the global model for an input unlike the
client's data, dual's sum for one just like it.

FedDPA's reference code sets ``a = 0.5 * mean cosine similarity`` of the input to five
sampled local training instances (last-layer states, local adapter alone) and mixes the
adapters as ``(1 - a) global + a local``, 0.5/0.5 being the mix its local adapter was
trained in (FedDPA-T). (Its inference script passes ``a`` to the global adapter's slot,
which would do the opposite of the paper's aim; the aim is followed here.) That is a
straight line from the global adapter alone (no likeness) to the training mix (full
likeness). Here the personal adapter is trained on top of the whole global one, so the
same line reads ``global + t * personal``.

The mean cosine similarity to every reference input is the unit embedding's dot product
with the mean of the references' unit embeddings: the client computes that one vector
from its own train split at each evaluation; it is neither stored nor sent. `prepare`
(what ``fedlora export`` writes) is dual's sum: a merged model has no per-input weight.
A causal LM's held-out text is scored whole (teacher forcing), so its weight comes from the
whole sequence, where the paper's comes from the prompt before generating.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedlora.lora.row_weights import RowWeights, row_weighted
from fedlora.models import GLOBAL, PERSONAL
from fedlora.personalization.base import register
from fedlora.personalization.dual import Dual
from fedlora.train import evaluate

if TYPE_CHECKING:
    import torch

    from fedlora.lora.adapters import AdapterState
    from fedlora.models import LoadedModel
    from fedlora.personalization.base import Local
    from fedlora.train import EvalResult, Tokenized

__all__ = ["REFERENCE_EXAMPLES", "FedDPA", "instance_weighted"]

REFERENCE_EXAMPLES = 256  # training inputs (a seeded sample) an input is compared with
_EMBED_ROWS = 32  # training inputs embedded at once


def _personal_weight(similarity: torch.Tensor) -> torch.Tensor:
    """(B,) weight on the personal adapter from the (B,) mean cosine similarities."""
    return similarity.clamp(0.0, 1.0)


def _attention_mask(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
    """(B, L) mask of the backbone call, wherever it was passed (all ones if it was not)."""
    import torch  # noqa: PLC0415 - heavy: torch

    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if mask is not None else torch.ones(hidden.shape[:2], device=hidden.device)


def _unit_embedding(hidden: torch.Tensor, mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """(B, H) float32 unit vectors: the last real token's state (causal LM) or the tokens' mean."""
    import torch  # noqa: PLC0415 - heavy: torch

    hidden, mask = hidden.float(), mask.to(hidden.device, torch.float32)  # (B, L, H), (B, L)
    if causal:
        positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
        last = (mask * (positions + 1)).argmax(dim=1)  # (B,): left or right padding alike
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


class _Weighting:
    """A forward pre-hook on the backbone: weigh each row of the batch before any layer runs."""

    def __init__(self, weights: RowWeights, *, causal: bool) -> None:
        self.weights, self.causal = weights, causal
        self.reference: torch.Tensor | None = None  # (H,): mean unit embedding of the client's inputs
        self._busy = False

    def embed(self, backbone: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """(B, H) unit embeddings of one backbone call's inputs, with the personal adapter alone."""
        import torch  # noqa: PLC0415 - heavy: torch

        saved, self._busy = self.weights.lora, True
        self.weights.lora = {GLOBAL: 0.0, PERSONAL: 1.0}
        try:
            with torch.no_grad():
                hidden = backbone(*args, **kwargs)[0]  # (B, L, H)
        finally:
            self.weights.lora, self._busy = saved, False
        return _unit_embedding(hidden, _attention_mask(args, kwargs, hidden), causal=self.causal)

    def __call__(self, backbone: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._busy or self.reference is None:
            return
        similarity = self.embed(backbone, args, kwargs) @ self.reference  # (B,)
        self.weights.lora = {PERSONAL: _personal_weight(similarity)}


def _reference(weighting: _Weighting, backbone: Any, loaded: LoadedModel, train: Tokenized, seed: int) -> Any:
    """(H,) mean unit embedding of at most `REFERENCE_EXAMPLES` of the client's training inputs."""
    import torch  # noqa: PLC0415 - heavy: torch

    from fedlora.models.device import autocast, model_device  # noqa: PLC0415 - heavy: torch

    rows = sorted(random.Random(seed).sample(range(len(train)), min(len(train), REFERENCE_EXAMPLES)))
    device = model_device(loaded.model)
    total = torch.zeros(backbone.config.hidden_size, device=device)
    for lo in range(0, len(rows), _EMBED_ROWS):
        batch = train.batch(rows[lo : lo + _EMBED_ROWS])
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        with autocast(loaded.config.precision, device):
            total += weighting.embed(backbone, (), inputs).sum(0)
    # No training input: nothing is like the client's data, so every input gets the global model.
    return total / max(len(rows), 1)


@contextlib.contextmanager
def instance_weighted(loaded: LoadedModel, train: Tokenized, *, seed: int = 0) -> Iterator[RowWeights]:
    """While inside, each input weights the personal adapter by its likeness to ``train``'s inputs.

    The model must compute with both adapters, the personal head last (`Dual.prepare`).
    On entry the mean unit embedding of (a ``seed``-ed sample of) ``train``'s inputs is
    computed; then every forward pass first embeds its batch, with the personal adapter
    alone, and sets each row's weight (FedDPA, Yang et al., NeurIPS 2024,
    arXiv:2403.19211). Yields the weights, which hold the last batch's after a pass.
    Every hook is removed on exit.
    """
    model = loaded.model
    backbone: Any = model.get_base_model().base_model  # the transformer under the task head
    weights = RowWeights(head_base=GLOBAL)
    weighting = _Weighting(weights, causal=loaded.config.causal)
    with row_weighted(model, weights):
        model.eval()
        weighting.reference = _reference(weighting, backbone, loaded, train, seed)
        handle = backbone.register_forward_pre_hook(weighting, with_kwargs=True)
        try:
            yield weights
        finally:
            handle.remove()


@register
class FedDPA(Dual):
    """Personalized = global LoRA + t(x) * personal LoRA, t(x) the input's likeness to the client's data."""

    name = "feddpa"
    # Its prediction needs hooks that `evaluate` installs: `personal-mix` cannot mix it yet.
    mixable = False
    paper = "FedDPA (Yang et al., NeurIPS 2024, arXiv:2403.19211)"
    summary = (
        "dual's adapters; each input weights the personal one by its mean cosine similarity "
        "to the client's training inputs"
    )
    keeps = (
        "as `dual`: a personal LoRA adapter + head offset; the mean embedding of its training "
        "inputs is recomputed at each evaluation, never stored"
    )
    prediction = (
        "global + t(x) * personal LoRA and head offset, t(x) = mean cosine similarity of the "
        "input to the client's training inputs, clamped to [0, 1]"
    )

    def evaluate(self, local: Local, stored: AdapterState | None) -> EvalResult:
        """Held-out metrics, each input with its own weight on the personal adapter."""
        self.prepare(local, stored)
        with instance_weighted(local.loaded, local.train, seed=local.seed):
            return evaluate(local.loaded.model, local.test, precision=local.loaded.config.precision)
