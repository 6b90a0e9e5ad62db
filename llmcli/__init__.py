"""llmcli: a command-line lab for conflicting objectives and mismatched generalisation."""

__version__ = "0.1.0"
