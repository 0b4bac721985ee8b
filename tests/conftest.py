"""Test setup: 8 host CPU devices, set once before JAX starts."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run, shared by pytest's workers and by the processes that
# tests start (resume, multi-host, CLIs): a program is compiled once per run, not once per
# process. Entries are keyed by the program, its devices and the JAX version, never reused wrongly.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="fromscratch-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The test process is the program: it parses absl flags (grain's worker processes read them),
# as absl.app.run does for the command-line tools. Data code never touches them.
from absl import flags  # noqa: E402

flags.FLAGS(["pytest"], known_only=True)


def assert_trees_close(got, want, rtol=1e-5, floor=1e-8):
  """Leaf by leaf, within rtol of that leaf's largest magnitude: fp32 sums in another order
  differ relative to the tensor's scale, not to each entry (a near-zero entry may differ more
  than its own size). `floor` admits the rounding noise of a gradient that is zero in exact
  arithmetic, such as a key bias's (softmax ignores a shift shared by a query's logits)."""

  def check(path, a, b):
    scale = float(np.abs(np.asarray(b)).max())
    np.testing.assert_allclose(
      a, b, rtol=0, atol=rtol * scale + floor, err_msg=jax.tree_util.keystr(path)
    )

  jax.tree_util.tree_map_with_path(check, got, want)


def log_softmax64(logits):
  """log_softmax in float64 NumPy: an independent reference for the model's losses."""
  shifted = np.asarray(logits, np.float64)
  shifted = shifted - shifted.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
