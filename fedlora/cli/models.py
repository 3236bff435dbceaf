"""``fedlora export``, ``predict`` and ``generate``: a client's personalized model, outside fedlora."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedlora.core.errors import FedloraError

__all__ = ["add_model_commands"]


def _export(args: argparse.Namespace) -> int:
    """Write a client's personalized model as a plain transformers model."""
    from fedlora.export import client_state_file, export_client  # noqa: PLC0415 - heavy: torch, transformers

    state = client_state_file(Path(args.source), args.client)
    result = export_client(state, Path(args.out), verify=not args.no_verify)
    print(f"exported {state} -> {result.out_dir} ({result.task})")
    if not math.isnan(result.max_logit_difference):
        accuracy = "" if math.isnan(result.accuracy) else f"; held-out accuracy {100 * result.accuracy:.1f}%"
        print(
            f"checked on the client's held-out examples: merged model vs personalized model, "
            f"largest logit difference {result.max_logit_difference:.2e}{accuracy}"
        )
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FedloraError(f"--file: {path} does not exist")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise FedloraError("give text to run the model on: TEXT arguments or --file FILE (one text per line)")
    return texts


def _predict(args: argparse.Namespace) -> int:
    from fedlora.export import predict  # noqa: PLC0415 - heavy: torch, transformers

    texts = _texts(args)
    for text, (label, prob) in zip(texts, predict(Path(args.model_dir), texts), strict=True):
        print(f"{label}\t{prob:.3f}\t{text[:80]}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedlora.export import generate, model_task  # noqa: PLC0415 - heavy: torch, transformers

    chat = True if args.chat else None  # a chat model answers as one by default
    for prompt in _texts(args):
        out = generate(Path(args.model_dir), prompt, max_new_tokens=args.max_new_tokens, chat=chat)
        if chat or model_task(Path(args.model_dir)) == "chat":
            print(f"user: {prompt}\nassistant: {out}")
        else:
            print(prompt + out)
    return 0


def add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export``, ``predict`` and ``generate`` to the ``fedlora`` parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``add_subparsers()`` object of the ``fedlora`` parser.

    """
    export = sub.add_parser(
        "export",
        help="write a client's personalized model (adapters merged into the base) for plain transformers",
    )
    export.add_argument("source", help="a run directory, a device's state-dir, or a client's .state file")
    export.add_argument(
        "--client",
        help="which client of a run directory: its name in the run's results (summary.json, per_client()) "
        "or its partition number (default 0)",
    )
    export.add_argument("--out", required=True, help="folder for the model")
    export.add_argument(
        "--no-verify", action="store_true", help="skip comparing the merged model with the client's own"
    )
    export.set_defaults(func=_export)
    for name, helptext, func in (
        ("predict", "classify text with an exported model", _predict),
        ("generate", "continue text (or answer a chat prompt) with an exported causal LM", _generate),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("model_dir", help="a folder written by `fedlora export`")
        command.add_argument("text", nargs="*", help="texts (or prompts)")
        command.add_argument("--file", help="a file with one text per line")
        if name == "generate":
            command.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add (default 40)")
            command.add_argument(
                "--chat",
                action="store_true",
                help="each prompt is a user turn, rendered by the model's chat template; the reply is "
                "printed (the default for a model trained with task=chat)",
            )
        command.set_defaults(func=func)
