"""The one exception type the workbench raises for mistakes a user can fix."""

from __future__ import annotations

__all__ = ["WorkbenchError"]


class WorkbenchError(ValueError):
    """A user-facing error: the message says what was wrong, what was expected and how to fix it.

    The CLI prints the message on one line and exits with status 2; library users can catch it
    (it is a ``ValueError``) without importing torch internals.
    """
