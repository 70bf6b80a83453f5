"""One exception type for every problem a user can fix (bad file, unknown layer, ...).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class ZfnetError(Exception):
    """A user-facing error: the message names the file, argument or value that is wrong."""
