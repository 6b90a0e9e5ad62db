"""Deprecated location, kept for one release: import from `llmcli.experiments.sweep`."""

import warnings

from llmcli.experiments.sweep import sweep_alpha  # noqa: F401

warnings.warn("llmcli.sweep moved to llmcli.experiments.sweep; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
