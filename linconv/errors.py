"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class LinconvError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def error_line(exc: BaseException) -> str:
    """One line that says what went wrong in a library's (often multi-line) exception.

    Usually the first non-empty line; for a transformers config validation error (huggingface_hub's
    strict dataclasses) the last one, which holds the validator's message under a generic heading.
    The exception's type name when it has no message.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if type(exc).__name__.startswith("StrictDataclass") and len(lines) > 1:
        return lines[-1].split(": ", 1)[-1]
    return lines[0].rstrip(" :")
