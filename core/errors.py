"""The one error type users see: a single line that names the thing and the fix."""


class HubquantError(Exception):
    """A user-facing error. Its message is one line: what is wrong and what to do about it.

    The CLI prints it as `hubquant: error: <message>` and exits non-zero (no traceback
    unless `--debug`).
    """
