"""The errors a user can fix. ``ldct-node`` prints one of them as a single line and exits 2; any
other exception is a bug and shows its traceback.

This module imports nothing, so every part of the node and the trainer can raise these errors
without importing the command line (or torch)."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; `ldct-node` prints it as one line and exits 2."""


class CommandError(UserError):
    """A command's arguments or inputs cannot work; the message says what to change."""
