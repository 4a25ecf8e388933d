"""The project's own errors: problems with what the user gave us, not bugs.

The command layer (``conretriever.cli``) prints any :class:`UserError` as one line,
``conretriever <command>: error: <message>``, and exits with status 2, without a traceback
(``--debug`` or ``CONRETRIEVER_DEBUG=1`` shows it). Messages name what to fix: the file, line
and field, or the flag, its value and what is allowed. A message may list several problems, one
per line after the first.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused request; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A config file, flag or setting that cannot be used; names the file/flag and the value."""


class DataError(UserError, ValueError):
    """Bad data; names the file, line and field of every problem found."""


class TrainingError(UserError):
    """A run that cannot go on (a non-finite loss, say); names the step and what was kept."""
