"""The one error type users see.

Anything the user can fix (a bad config, bad data, a missing dependency) raises
``UserError``. The CLIs print its message without a traceback and exit with code 2.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""
