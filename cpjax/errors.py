"""The one exception type for user mistakes.

Every public entry point raises :class:`CpjaxError` (a ``ValueError``) for bad input, with a
message that names the argument, the offending value and the rule it breaks. The CLI prints
such errors as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class CpjaxError(ValueError):
    """A user mistake: bad argument, bad file, unsupported model."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`CpjaxError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CpjaxError(message)


class NonFiniteError(CpjaxError):
    """NaN/Inf in an output, found by the check mode (``check_finite=True``); the message names
    the first layer where it appears."""
