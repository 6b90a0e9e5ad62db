"""Deprecated location, kept for one release: import from `llmcli.evaluation.generate`."""

import warnings

from llmcli.evaluation.generate import generate, generate_all  # noqa: F401

warnings.warn("llmcli.generate moved to llmcli.evaluation.generate; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
