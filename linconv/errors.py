"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class LinconvError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first non-empty line of ``exc``'s message (library errors are often multi-line), for a
    one-line :class:`LinconvError`; the exception's type name when the message is empty.
    ``with_type``: prefix the type name (``"KeyError: 'x'"``), for errors that are not the user's."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    text = lines[0].rstrip(" :")
    return f"{name}: {text}" if with_type else text
