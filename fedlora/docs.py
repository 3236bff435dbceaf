"""The README's generated parts: method tables and the configuration reference, from metadata.

Each generated part stands between ``<!-- fedlora:NAME -->`` and ``<!-- /fedlora:NAME -->``
in README.md. ``python -m fedlora.docs`` (``make docs``) rewrites them from the strategy
and personalization registries and the config fields' metadata; ``tests/test_docs.py``
fails while the README differs from what they say.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fedlora.config import reference_table
from fedlora.personalization import PERSONALIZATIONS
from fedlora.strategies import STRATEGIES
from fedlora.strategies.registry import FAMILIES

__all__ = ["SECTIONS", "personalization_table", "render", "strategy_table"]

_PARTS = {"lora_A": "A", "lora_B": "B", "head": "head"}


def _yes_no(flag: bool, note: str = "") -> str:
    shown = "**yes**" if flag else "no"
    return f"{shown} ({note})" if note else shown


def strategy_table() -> str:
    """The README's strategy table: one row per registered strategy."""
    rows = [
        "| name | paper | what the server does | client sends | exact | mixed ranks | sum only |",
        "|---|---|---|---|---|---|---|",
    ]
    # The FedAvg family first, then the LoRA-aware strategies, then the robust ones.
    for info in sorted(STRATEGIES.values(), key=lambda i: (FAMILIES.index(i.family), i.name)):
        sends = ", ".join(label for part, label in _PARTS.items() if part in info.protocol.sent)
        rows.append(
            f"| `{info.name}` | {info.paper or '-'} | {info.description or info.summary} | {sends} "
            f"| {_yes_no(info.exact, info.exact_note)} | {_yes_no(info.protocol.heterogeneous_ranks)} "
            f"| {'yes' if info.sum_only else 'no'} |"
        )
    return "\n".join(rows)


def personalization_table() -> str:
    """The README's personalization table: one row per registered method."""
    rows = [
        "| name | paper | what the client keeps (never sent) | personalized prediction |",
        "|---|---|---|---|",
    ]
    for method in PERSONALIZATIONS.values():
        rows.append(f"| `{method.name}` | {method.paper or '-'} | {method.keeps} | {method.prediction} |")
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "strategies": strategy_table,
    "personalizations": personalization_table,
    "config": reference_table,
}


def _between(body: str, match: re.Match[str]) -> str:
    return match.group(1) + body + match.group(2)


def render(text: str) -> str:
    """``text`` (the README) with every generated part replaced by what the metadata says.

    Raises
    ------
    ValueError
        If a part's markers are missing.

    """
    for name, build in SECTIONS.items():
        pattern = re.compile(rf"(<!-- fedlora:{name} -->\n).*?(\n<!-- /fedlora:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README: no <!-- fedlora:{name} --> ... <!-- /fedlora:{name} --> markers")
        # A replacement function, so that backslashes in the table are taken literally.
        text = pattern.sub(functools.partial(_between, build()), text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated parts of the README given (default: ./README.md)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "README.md")
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
