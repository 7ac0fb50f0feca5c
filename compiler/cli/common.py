"""What every command shares: the exit codes and the `--set` overrides."""

from __future__ import annotations

import argparse

from compiler.loading.overrides import Override, parse_override

EXIT_OK, EXIT_USER, EXIT_BUG = 0, 1, 2
SET_HELP = ("override one recipe value, e.g. --set train.learning_rate=1e-4, or remove a key with "
            "--set train.epochs=none (repeatable; shown in the plan)")


def overrides(args: argparse.Namespace) -> list[Override]:
    """The command's `--set KEY=VALUE` options, parsed (none for commands without them)."""
    return [parse_override(text) for text in getattr(args, "set", None) or []]
