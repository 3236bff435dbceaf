"""``python -m fedlora.cli``: the ``fedlora`` command."""

import sys

from fedlora.cli import main

__all__: list[str] = []

sys.exit(main())
