"""How every ``vit`` command reports a mistake the user can fix: ``error: <message>`` on stderr, no traceback, and
exit status 2 (the status click gives its own usage errors), unless the caller names another."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

import click

USER_ERROR = 2


def fail(message: str, *, exit_code: int = USER_ERROR) -> NoReturn:
    """Print ``error: MESSAGE`` to stderr and exit with ``exit_code``. Lines after the first in ``message`` are
    printed as they are (advice, say), without a prefix of their own."""
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


@contextlib.contextmanager
def failing_on(*errors: type[Exception], describe: Callable[[Exception], str] = str) -> Iterator[None]:
    """Within the block, or the command it decorates, an exception of one of ``errors`` becomes :func:`fail` with
    ``describe(exception)`` as the message; any other exception passes through."""
    try:
        yield
    except errors as err:
        fail(describe(err))
