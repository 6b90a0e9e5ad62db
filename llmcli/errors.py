"""Exception types the command line turns into one line on stderr and an exit code."""


class UserError(Exception):
    """Bad input: a config, data file, run folder, checkpoint or CLI argument. Printed as one line, exit 2."""


class RunFailed(Exception):
    """A run could not go on (e.g. its loss became NaN): printed as one line, exit 1."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint; exit 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
