"""The error types users see.

Anything the user can fix (a bad config, bad data, a missing dependency) raises
``UserError``. The CLIs print its message without a traceback and exit with code 2; a
sweep stopped by a signal with its state saved exits with code 3, so that a script (the
SLURM job) can tell "resume me" from "fix me".
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""


class SweepInterrupted(UserError):
    """A stop signal (Ctrl-C, SLURM's time-limit warning) ended the sweep; --resume continues it."""

    exit_code = 3
