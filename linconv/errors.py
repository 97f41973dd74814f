"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class LinconvError(Exception):
    """A problem with the user's input or environment, explained in one line."""
