"""Deprecated location, kept for one release: import from `llmcli.training.engine`."""

import warnings

from llmcli.training.engine import TIMING_KEYS, train  # noqa: F401

warnings.warn("llmcli.train moved to llmcli.training.engine; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
