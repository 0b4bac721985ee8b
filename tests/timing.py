"""Time bounds that mean the same on any CPU. A bound was set on the 2-core Intel Xeon
(AVX-512) machines whose float32 matmul peak is about 340 GFLOP/s
(train.metrics.measure_peak_flops); on another machine it is scaled by that machine's peak,
measured just before and just after the timed call, so under the same load as the call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from train.metrics import measure_peak_flops

REFERENCE_FLOPS = 340e9


def timed(fn: Callable[[], Any], reference_seconds: float) -> tuple[Any, float, float]:
  """(fn(), the seconds it took, the bound: `reference_seconds` scaled to this machine)."""
  peak = measure_peak_flops()
  t0 = time.perf_counter()
  out = fn()
  seconds = time.perf_counter() - t0
  peak = (peak + measure_peak_flops()) / 2
  return out, seconds, reference_seconds * REFERENCE_FLOPS / peak
