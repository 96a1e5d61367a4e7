"""The errors a user can cause, and the command-line entry that reports them as one line."""

from __future__ import annotations

import os
import sys


class TrainingStopped(RuntimeError):
    """The run cannot give a usable model (non-finite losses or weights); `run_from_command_line` reports it in one line."""


def run_from_command_line(main, argv: list[str] | None = None) -> int:
    """`main(argv)`, with the errors a user can cause (bad data or model paths, flags that cannot apply, a diverged
    run) reported as one line on stderr and exit status 1 instead of a traceback. Set MQIRTN_TRACEBACK=1 to see the
    traceback."""
    from huggingface_hub.errors import StrictDataclassError  # what a config's validators raise (--config_overrides)

    try:
        main(argv)
    except (TrainingStopped, ValueError, OSError, StrictDataclassError) as error:
        if os.environ.get("MQIRTN_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1
    return 0
