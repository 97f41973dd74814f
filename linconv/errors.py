"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class LinconvError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """One line that says what went wrong in a library's (often multi-line) exception, for a one-line
    :class:`LinconvError`: usually the first non-empty line; for a transformers config validation error
    (huggingface_hub's strict dataclasses) the last one, which holds the validator's message under a
    generic heading; the exception's type name when it has no message. ``with_type``: prefix the type
    name (``"KeyError: 'x'"``), for errors that are not the user's."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    if name.startswith("StrictDataclass") and len(lines) > 1:
        text = lines[-1].split(": ", 1)[-1]
    else:
        text = lines[0].rstrip(" :")
    return f"{name}: {text}" if with_type else text
