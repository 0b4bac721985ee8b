"""A full disk for tests: files may not grow past a size (RLIMIT_FSIZE), so writes fail with
EFBIG as a full disk refuses them, rather than the signal that limit sends killing the
process."""

import contextlib
import resource
import signal


@contextlib.contextmanager
def full_disk(limit_bytes: int):
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  previous = resource.getrlimit(resource.RLIMIT_FSIZE)
  hard = previous[1]
  soft = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
  resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, previous)
    signal.signal(signal.SIGXFSZ, previous_handler)
