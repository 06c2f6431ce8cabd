"""The one exception type users see."""


class PissaError(ValueError):
    """A user-facing error whose message says what to do; the CLI prints it on one line and exits 2."""
