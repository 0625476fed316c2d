"""The one exception type for user mistakes: its message is a sentence naming the problem and the fix."""


class ActsparseError(ValueError):
    """A mistake in what the user asked for (a bad pattern, a missing model, a text too short, ...).

    The CLI prints the message alone and exits non-zero; the Python API lets it propagate.
    """


def shorten(text: str, limit: int = 120) -> str:
    """``text`` as an error message quotes it: whole when short, else its first ``limit`` characters
    and how many more there were (a 1 MB line is not echoed back)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
