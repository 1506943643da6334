"""Parsing gin files and bindings: what `tfadv.main` and the tools share (no flags here)."""

import logging as std_logging
import os

import gin

_SEARCH_PATHS = set()


class ConfigError(ValueError):
  """A gin file or binding that cannot be applied."""


def parse_config(gin_files, gin_params, extra_search_paths=()):
  """Parses gin files and bindings; errors name the offending binding."""
  import tfadv.configurables  # pylint: disable=g-import-not-at-top,unused-import
  for path in gin_files:
    if not os.path.exists(path) and "://" not in path:
      raise ConfigError(f"--gin_file={path}: no such file.")
  # `include 'base/x.gin'` resolves next to the including file.
  for path in list(extra_search_paths) + [os.path.dirname(p) for p in gin_files]:
    if path not in _SEARCH_PATHS:
      gin.add_config_file_search_path(path)
      _SEARCH_PATHS.add(path)
  # gin logs every include it looks for along the search path as an error.
  std_logging.disable(std_logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
  except (ValueError, KeyError, ImportError, SyntaxError, IOError) as e:
    raise ConfigError(f"In --gin_file={','.join(gin_files)}: {e}") from e
  finally:
    std_logging.disable(std_logging.NOTSET)
  for binding in gin_params:
    try:
      gin.parse_config(binding)
    except (ValueError, KeyError, ImportError, SyntaxError) as e:
      raise ConfigError(f"In --gin_param={binding!r}: {e}") from e
  gin.finalize()
