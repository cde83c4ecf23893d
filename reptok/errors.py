"""Error types. ``InputError`` means bad usage or bad input: the CLI prints its one-line message
and exits with code 2. Anything else is a failure (exit code 1)."""


class InputError(ValueError):
    """Bad usage or input (missing file, wrong shape, mismatched checkpoint): exit code 2."""


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss; the last good checkpoint is kept."""
