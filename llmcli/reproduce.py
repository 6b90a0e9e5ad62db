"""Deprecated location, kept for one release: import from `llmcli.experiments.reproduce`."""

import warnings

from llmcli.experiments.reproduce import reproduce  # noqa: F401

warnings.warn("llmcli.reproduce moved to llmcli.experiments.reproduce; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
