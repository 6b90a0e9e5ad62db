"""Deprecated location, kept for one release: import from `llmcli.evaluation.evaluate`."""

import warnings

from llmcli.evaluation.evaluate import evaluate  # noqa: F401

warnings.warn("llmcli.evaluate moved to llmcli.evaluation.evaluate; this alias goes in the next release",
              DeprecationWarning, stacklevel=2)
