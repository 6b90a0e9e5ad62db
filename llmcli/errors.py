"""The one exception type that means "the user gave us something wrong" (exit code 2)."""


class UserError(Exception):
    """Bad input: a config, data file, run folder, checkpoint or CLI argument. Printed as one line."""
