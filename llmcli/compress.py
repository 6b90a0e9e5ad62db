"""Deprecated location, kept for one release: import from `llmcli.experiments.compress`."""

import warnings

from llmcli.experiments.compress import compress  # noqa: F401

warnings.warn("llmcli.compress moved to llmcli.experiments.compress; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
