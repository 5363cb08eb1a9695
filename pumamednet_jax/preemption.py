"""Preemption: the step at which a run told to stop (SIGTERM) saves and exits.

Several processes must save the same step, or the checkpoint's collective
writes wait forever. After `jax.distributed.initialize()`, JAX's preemption
sync manager catches SIGTERM in whichever process gets it, tells the others
through the coordination service, and picks a step that every process reaches
(the largest step any of them reported, plus one);
`CheckpointManager.reached_preemption(step)` is true at that step in every
process. Without the distributed runtime (one process), a SIGTERM handler sets
a flag that the next step sees.
"""

import signal

import jax
from absl import logging


def _synchronized() -> bool:
  """Whether JAX's preemption sync manager watches SIGTERM in this process."""
  return (jax.distributed.is_initialized() and
          jax.config.jax_enable_preemption_service)


class Preemption:
  """Says after each step whether to save it and exit; a context manager that
  installs the SIGTERM handler of single-process runs."""

  def __init__(self, manager):
    self._manager = manager
    self._synchronized = _synchronized()
    self._signalled = False
    self._previous = None

  def __enter__(self):
    if self._synchronized:  # a Python handler would replace JAX's
      return self
    if jax.process_count() > 1:
      logging.warning('jax_enable_preemption_service is off: SIGTERM stops '
                      'only the process that gets it')

    def handler(signum, frame):
      del signum, frame
      self._signalled = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """True at the step to save before exiting (call it after every step)."""
    if self._synchronized:
      return self._manager.reached_preemption(step)
    return self._signalled
