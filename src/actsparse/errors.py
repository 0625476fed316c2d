"""The one exception type for user mistakes: its message is a sentence naming the problem and the fix."""


class ActsparseError(ValueError):
    """A mistake in what the user asked for (a bad pattern, a missing model, a text too short, ...).

    The CLI prints the message alone and exits non-zero; the Python API lets it propagate.
    """
