"""What the CLI's commands share: config errors as one clean message, and SIGTERM
handled like Ctrl-C by commands that start processes of their own."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import typer

from fedmq.runtime import config as cfgmod


def load_config_or_exit(model, path: Path):
    """The validated config, or the error naming file, key and expectation and exit 2."""
    try:
        return cfgmod.load(model, path)
    except cfgmod.ConfigError as exc:
        typer.echo(f"config error:\n{exc}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, kill, a CI timeout) unwinds like Ctrl-C: the processes a
    command started are stopped by its own cleanup, not orphaned."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
