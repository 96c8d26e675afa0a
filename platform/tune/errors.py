"""The error a sweep raises when it cannot start or finish (the CLI prints it as one line, exit code 2)."""

from hidrop.errors import UserError


class TuneSetupError(UserError, RuntimeError):
    """A sweep that cannot start or finish; one line for the user."""
