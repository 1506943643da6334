"""Shared timing loop of the step-time benchmarks."""

import time


def best_step_time(trainer, iterator, steps: int, repeats: int, warmup: int = 3) -> float:
  """Seconds per step: best of `repeats` loops of `steps`, after a warm-up loop.

  The warm-up traces and compiles the step; `Trainer.train` returns only
  after the loop's metrics reached the host, so each loop is fully timed.
  """
  trainer.train(iterator, warmup)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    trainer.train(iterator, steps)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def report(name: str, seconds: float, baseline: float, target=None) -> str:
  ratio = seconds / baseline
  note = f" (target <= {target:.2f}x: {'met' if ratio <= target else 'missed'})" if target else ""
  return f"{name:28s} {1000 * seconds:8.1f} ms/step  {ratio:5.2f}x{note}"
