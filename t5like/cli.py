"""What every `python -m t5like.X` command does with bad input: `error: ...` and exit 2, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[], int]) -> None:
    """sys.exit(main()), with a ValueError or FileNotFoundError (bad input, named by its message) printed as
    `error: ...` and exit code 2. main itself raises them, so Python callers and tests see the exception."""
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
