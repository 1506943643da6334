"""SIGTERM-safe training: a preempted run saves at the next step boundary and exits.

A preempted Cloud TPU VM, Kubernetes and most cluster managers send SIGTERM
and wait a grace period before SIGKILL. Python runs signal handlers only
between bytecodes of the main thread, which sits inside the in-graph training
loop for a whole `steps_per_loop` chunk; so the watcher asks Python's C-level
handler to write the signal number to a socket (`signal.set_wakeup_fd`) and a
thread waiting on that socket sets the trainer's `stop_requested` variable at
once. The loop checks the variable before every step, the controller saves a
checkpoint at the step reached, and `Preempted` ends the run with exit status
143 (128 + SIGTERM). Rerunning the same command resumes at exactly that step.
"""

import signal
import socket
import threading

import tensorflow as tf

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint at `step`."""

  def __init__(self, step: int, path: str):
    super().__init__(f"Preempted (SIGTERM) at step {step}; checkpoint {path}. "
                     "Rerun the same command to resume.")
    self.step = step
    self.path = path


class SigtermWatcher:
  """Within the `with` block, SIGTERM sets `flag` (a boolean `tf.Variable`).

  Example:
  >>> with SigtermWatcher(trainer.stop_requested) as watcher:
  ...   trainer.train(iterator, 1000)  # returns early after a SIGTERM
  >>> watcher.triggered
  """

  def __init__(self, flag: tf.Variable):
    self.flag = flag
    self.triggered = False
    self._active = False

  def __enter__(self):
    self.flag.assign(False)
    if threading.current_thread() is not threading.main_thread():
      return self  # signals can only be routed from the main thread
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
    self._previous_fd = signal.set_wakeup_fd(self._write.fileno())
    self._thread = threading.Thread(target=self._watch, name="sigterm-watcher",
                                    daemon=True)
    self._thread.start()
    self._active = True
    return self

  def _on_signal(self, signum, frame):
    del signum, frame
    self.triggered = True  # the thread has already set the flag

  def _watch(self):
    while True:
      try:
        data = self._read.recv(64)
      except OSError:
        return
      if not data:
        return
      if signal.SIGTERM in data:
        self.triggered = True
        self.flag.assign(True)

  def __exit__(self, *exc):
    if self._active:
      signal.set_wakeup_fd(self._previous_fd)
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._write.close()
      self._read.close()
      self._active = False
    return False
