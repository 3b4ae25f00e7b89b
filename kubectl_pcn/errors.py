"""Errors that name their fix. Exit codes: 1 = the cluster or the API said no,
2 = the input is wrong (unknown type, bad rule, bad flag)."""

from __future__ import annotations

import click


class PcnError(click.ClickException):
    """A failure with a message for people; click prints it as `Error: ...`."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message + (f"\n{hint}" if hint else ""))
        self.hint = hint


class InputError(PcnError):
    """What the user typed cannot work; nothing was sent to the cluster."""

    exit_code = 2


class NotReachable(PcnError):
    """No API server answered."""


class CrdsMissing(PcnError):
    """The pcn.dev resources are not installed in the cluster."""


class Forbidden(PcnError):
    """RBAC denied a request."""


class Conflict(PcnError):
    """The object changed (or appeared) between our read and our write."""
