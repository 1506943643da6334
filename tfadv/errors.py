"""Errors a user fixes by changing the command, not the code.

`tfadv.main` prints their one-line message (which names the fix) and exits
with status 2, without a traceback; nothing has been written by then.
"""


class MissingInputError(FileNotFoundError):
  """An input the run reads is not there (data, preset, installed dataset)."""


class InputDataError(ValueError):
  """An input file the run reads is broken (bytes, JSON, fields, labels);
  the message names `file:line` and the fix."""


class SettingError(ValueError):
  """A setting (a gin binding) that no longer exists or cannot work; the
  message names the binding to use instead."""
