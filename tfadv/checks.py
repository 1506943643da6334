"""Argument checks for every configurable: one line naming the parameter, its value and its range.

A sign typo (`EmbeddingFGM.epsilon = -1.0`) does not fail on its own: FGM
then steps *down* the loss and trains quietly the wrong way. So each
configurable checks its numbers and names when it is built, and a value
out of range is a `SettingError` (`tfadv.main` prints its one line and exits
with status 2 before anything is written):

    tfadv: EmbeddingFGM.epsilon = -1.0 is out of range: expected a number >= 0.

Example:
>>> check("EmbeddingFGM", epsilon=(1.0, NON_NEGATIVE), norm=("l2", one_of(("l2", "sign"))))
>>> check("FreeLB", ascent_steps=(0, AT_LEAST_ONE))
Traceback (most recent call last):
...
tfadv.errors.SettingError: FreeLB.ascent_steps = 0 is out of range: expected an integer >= 1.
"""

import math
import numbers
from typing import Callable, Sequence, Tuple

from tfadv.errors import SettingError


class Rule:
  """A predicate on a value and the words for what it accepts."""

  def __init__(self, expected: str, accepts: Callable[[object], bool]):
    self.expected = expected
    self.accepts = accepts

  def __repr__(self):
    return f"Rule({self.expected!r})"


def _number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def _integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


NON_NEGATIVE = Rule("a number >= 0", lambda v: _number(v) and v >= 0)
POSITIVE = Rule("a number > 0", lambda v: _number(v) and v > 0)
FRACTION = Rule("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
OPEN_FRACTION = Rule("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
PROPER_FRACTION = Rule("a number strictly between 0 and 1", lambda v: _number(v) and 0 < v < 1)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _integer(v) and v >= 0)
AT_LEAST_ONE = Rule("an integer >= 1", lambda v: _integer(v) and v >= 1)
AT_LEAST_TWO = Rule("an integer >= 2", lambda v: _integer(v) and v >= 2)
FINITE = Rule("a finite number", _number)
FRACTIONS = Rule("numbers in [0, 1]",
                 lambda v: all(_number(x) and 0 <= x <= 1 for x in v))


def one_of(choices: Sequence) -> Rule:
  return Rule(f"one of {tuple(choices)}", lambda v: v in tuple(choices))


def check(owner: str, **values: Tuple[object, Rule]) -> None:
  """Checks `name=(value, rule)` pairs of configurable `owner`; `None` passes
  (an optional parameter left to its default)."""
  for name, (value, rule) in values.items():
    if value is None or rule.accepts(value):
      continue
    raise SettingError(f"{owner}.{name} = {value!r} is out of range: expected "
                       f"{rule.expected}.")


def check_interval(owner: str, low_name: str, low, high_name: str, high) -> None:
  """`low` < `high` (a clip range, say)."""
  check(owner, **{low_name: (low, FINITE), high_name: (high, FINITE)})
  if not low < high:
    raise SettingError(f"{owner}.{low_name} = {low!r} and {owner}.{high_name} = "
                       f"{high!r}: expected {low_name} < {high_name}.")
