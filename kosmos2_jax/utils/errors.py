"""`UsageError`: bad input from the user (a flag, a config value, a file), shown by the commands as
one line with exit code 2. Every other exception keeps its traceback."""


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""
