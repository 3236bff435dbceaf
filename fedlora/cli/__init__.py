"""The ``fedlora`` console command: the top-level parser and its entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from fedlora.cli.audit import add_audit_command
from fedlora.cli.deploy import add_deploy_commands
from fedlora.cli.models import add_model_commands
from fedlora.cli.simulate import add_simulate_commands
from fedlora.core.errors import FedloraError, RunInterrupted

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated personalization with private LoRA adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_commands(sub)
    add_audit_command(sub)
    add_model_commands(sub)
    add_deploy_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` command.

    Parameters
    ----------
    argv : list[str] or None
        The arguments after ``fedlora``; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: the command's own, or 2 on a `FedloraError` (printed as one line).

    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RunInterrupted as err:
        print(f"fedlora: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130
    except FedloraError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
