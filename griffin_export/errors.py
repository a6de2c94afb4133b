"""The one exception type for user errors; the CLI prints it as one line, exit code 2."""


class GriffinError(Exception):
    """Bad input or a mismatch the user can fix. Anything else is a bug."""
