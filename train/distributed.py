"""Multi-process runs: jax.distributed from the config or the cluster's environment, and the
few agreements hosts must reach (who prepares data, which batch rows are whose, when to stop)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _on_cloud_tpu_vm() -> bool:
  try:  # a private flag, computed from local files without network; versions may move it
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
  except ImportError:
    return False
  return bool(running_in_cloud_tpu_vm)


def launcher(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this process runs under (one jax.distributed.initialize() can
  read without arguments), or None for a plain single process."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if all(k in env for k in _SLURM) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"  # an srun step; a bare salloc shell or a 1-task step stays single-process
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "openmpi"
  if env is os.environ and _on_cloud_tpu_vm():
    return "cloud-tpu"
  return None


def initialize(cfg: Mapping[str, Any] | None) -> str:
  """Sets up this process's devices and joins the job; call before JAX computes anything.

  Precedence: config.distributed.coordinator "off" means one process whatever the
  environment; a "host:port" joins that coordinator with the config's num_processes and
  process_id (those left unset are auto-detected by JAX from SLURM / Open MPI / Cloud TPU);
  "" joins only when the environment describes a multi-process job (see `launcher`).

  Returns how the process was set up, for the log.
  """
  cfg = dict(cfg or {})
  coordinator = cfg.get("coordinator", "")
  num_processes = int(cfg.get("num_processes", 0))
  process_id = int(cfg.get("process_id", -1))
  flags = cfg.get("xla_flags", "").split()
  current = os.environ.get("XLA_FLAGS", "").split()
  in_force = dict(f.partition("=")[::2] for f in current)  # the last of a repeated flag wins
  missing = [f for f in flags if in_force.get(f.partition("=")[0]) != f.partition("=")[2]]
  if missing:
    # XLA reads XLA_FLAGS once, when JAX starts its first backend: this must run before that.
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
      raise ValueError(
        f"distributed.xla_flags={cfg['xla_flags']!r} came after JAX started "
        "its backend, so XLA would ignore it: set it before any JAX computation"
      )
    os.environ["XLA_FLAGS"] = " ".join(current + missing)
  if cfg.get("local_device_count", 0):
    # Simulated host devices (CPU only); wins over XLA_FLAGS --xla_force_host_platform_device_count.
    jax.config.update("jax_num_cpu_devices", int(cfg["local_device_count"]))
  if coordinator == "off":
    return "single process (distributed.coordinator='off')"
  source = f"distributed.coordinator={coordinator}" if coordinator else launcher()
  if source is None:
    if num_processes > 1 or process_id >= 0:
      raise ValueError(
        f"distributed.num_processes={num_processes} / process_id={process_id} "
        f"need distributed.coordinator=host:port (process 0's address, reachable "
        f"from every host) or a launcher such as srun that JAX detects"
      )
    return "single process"
  if num_processes and process_id >= num_processes:
    raise ValueError(f"distributed.process_id={process_id} must be in [0, {num_processes})")
  # Cross-process collectives on CPU (a no-op elsewhere); gloo is 0.10's default, made explicit.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator or None,
    num_processes=num_processes or None,
    process_id=process_id if process_id >= 0 else None,
    initialization_timeout=int(cfg.get("timeout_seconds", 300)),
  )
  return (
    f"process {jax.process_index()} of {jax.process_count()} via {source}, "
    f"{jax.local_device_count()} of {jax.device_count()} devices here"
  )


def primary_first(fn: Callable[[], Any]) -> Any:
  """Runs fn on process 0, then (after a barrier) on the others: for work such as preparing
  data in a shared workdir that the others should find done instead of racing on."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils

  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("fromscratch: process 0 done first")
  return result if jax.process_index() == 0 else fn()


def batch_block(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """(block, blocks): the block of every global batch of `batch_size` rows that this
  process's devices hold under `sharding`; the data pipeline reads exactly those rows.

  jax.make_array_from_process_local_data places a process's rows on the global rows its
  devices own, so feeding any other rows would change the batch. Each process must own one
  contiguous, equal block; a layout that replicates the batch across processes is refused.
  """
  n = jax.process_count()
  if n == 1:
    return 0, 1
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
    rows.update(range(*index[0].indices(batch_size)))
  per = batch_size // n
  start = min(rows)
  if len(rows) != per or max(rows) + 1 - start != per or start % per:
    raise ValueError(
      f"this process's devices hold batch rows {sorted(rows)[:4]}... ({len(rows)} of "
      f"{batch_size}) but each of {n} processes must hold one contiguous block of {per}: shard "
      f"the batch (the activation_batch rule) over mesh axes that span the processes"
    )
  return start // per, n


def any_process(flags: Sequence[bool], step: int, every: int) -> tuple[bool, ...]:
  """Each flag OR-ed over processes, so all of them stop at the same step.

  With several processes they compare notes only at steps divisible by `every` (a small
  all-gather that waits for the step in flight) and otherwise report False; one process
  decides at once."""
  flags = tuple(bool(f) for f in flags)
  if jax.process_count() == 1:
    return flags
  if step % max(every, 1):
    return (False,) * len(flags)
  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(np.asarray(flags, dtype=np.int32))
  return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


def gather(x) -> np.ndarray:
  """A global array's rows on this host: all of them, from every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
