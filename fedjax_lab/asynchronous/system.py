"""The system model of an asynchronous simulation: client speeds, links and availability.

A client ``i`` that runs ``s`` local steps takes

    duration_i = comm_s[i] + s * compute_s_per_step[i]          (x lognormal jitter, optional)

simulated seconds from download to upload. Availability says who may *start*: a client is
dispatched only while it is available (a dispatched client finishes its job). It is a
boolean table ``[N, G]`` over ``G`` time bins of ``bin_s`` seconds, repeated with period
``G * bin_s`` (None: always available).

Everything is arrays (``SystemModel``), drawn from a seed with ``jax.random`` or read from
a CSV trace with ``client_id, compute_s_per_step, comm_s`` columns.
"""
import csv
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class SystemModel(NamedTuple):
  """Per-client system parameters, all on device.

  Attributes:
    compute_s_per_step: float32 ``[N]``, seconds per local step.
    comm_s: float32 ``[N]``, seconds of download + upload per job.
    available: bool ``[N, G]`` availability per time bin, or None (always available).
    bin_s: float32 scalar, width of an availability bin.
    jitter: float32 scalar, sigma of a per-job lognormal factor on the duration (0: none).
  """
  compute_s_per_step: jax.Array
  comm_s: jax.Array
  available: Optional[jax.Array] = None
  bin_s: jax.Array = jnp.float32(1.0)
  jitter: jax.Array = jnp.float32(0.0)

  @property
  def num_clients(self) -> int:
    return int(self.compute_s_per_step.shape[0])


DISTRIBUTIONS = ("constant", "lognormal", "pareto")


def draw_times(key, num_clients: int, distribution: str, scale: float,
               sigma: float = 1.0, shape: float = 1.5) -> jax.Array:
  """``[N]`` positive times with median-like ``scale``.

  * ``constant``: ``scale`` for every client;
  * ``lognormal``: ``scale * exp(sigma * z)``, ``z ~ N(0, 1)`` (median ``scale``);
  * ``pareto``: ``scale * U^(-1/shape)``, a heavy tail (minimum ``scale``; infinite
    variance for ``shape <= 2``).
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"Unknown time distribution {distribution!r}; choose one of "
                     f"{', '.join(DISTRIBUTIONS)}.")
  if scale < 0:
    raise ValueError(f"time scale must be >= 0, got {scale}.")
  if distribution == "constant":
    return jnp.full((num_clients,), scale, jnp.float32)
  if distribution == "lognormal":
    if sigma < 0:
      raise ValueError(f"lognormal sigma must be >= 0, got {sigma}.")
    return scale * jnp.exp(sigma * jax.random.normal(key, (num_clients,)))
  if shape <= 0:
    raise ValueError(f"pareto shape must be positive, got {shape}.")
  u = jax.random.uniform(key, (num_clients,), minval=1e-6, maxval=1.0)
  return scale * u ** (-1.0 / shape)


def make_system(key, num_clients: int, compute: str = "lognormal", compute_scale: float = 0.01,
                compute_sigma: float = 1.0, compute_shape: float = 1.5, comm: str = "constant",
                comm_scale: float = 0.1, comm_sigma: float = 1.0, comm_shape: float = 1.5,
                available: Optional[jax.Array] = None, bin_s: float = 1.0,
                jitter: float = 0.0) -> SystemModel:
  """A seeded system model: compute seconds per step and link seconds per job."""
  k_compute, k_comm = jax.random.split(key)
  if jitter < 0:
    raise ValueError(f"jitter must be >= 0, got {jitter}.")
  return SystemModel(
      draw_times(k_compute, num_clients, compute, compute_scale, compute_sigma, compute_shape),
      draw_times(k_comm, num_clients, comm, comm_scale, comm_sigma, comm_shape),
      None if available is None else _check_table(available, num_clients),
      jnp.float32(bin_s), jnp.float32(jitter))


def read_trace(path: str, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
  """``(compute_s_per_step [N], comm_s [N])`` from a CSV ``client_id, compute_s_per_step, comm_s``.

  A header row is allowed; every client ``0..N-1`` must appear exactly once.
  """
  compute = np.full(num_clients, np.nan)
  comm = np.full(num_clients, np.nan)
  with open(path) as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or row[0].strip().startswith("#"):
        continue
      try:
        client, step_s, comm_s = int(row[0]), float(row[1]), float(row[2])
      except (ValueError, IndexError):
        if line == 1:
          continue   # header
        raise ValueError(f"{path}:{line}: expected 'client_id, compute_s_per_step, comm_s', "
                         f"got {row!r}.") from None
      if not 0 <= client < num_clients:
        raise ValueError(f"{path}:{line}: client_id {client} is outside [0, {num_clients}).")
      if not np.isnan(compute[client]):
        raise ValueError(f"{path}:{line}: client_id {client} appears twice.")
      if step_s < 0 or comm_s < 0:
        raise ValueError(f"{path}:{line}: times must be >= 0, got {step_s}, {comm_s}.")
      compute[client], comm[client] = step_s, comm_s
  missing = np.flatnonzero(np.isnan(compute))
  if missing.size:
    raise ValueError(f"{path}: no row for clients {missing[:10].tolist()} "
                     f"({missing.size} of {num_clients}).")
  return compute.astype(np.float32), comm.astype(np.float32)


def system_from_trace(path: str, num_clients: int, available=None, bin_s: float = 1.0,
                      jitter: float = 0.0) -> SystemModel:
  compute, comm = read_trace(path, num_clients)
  return SystemModel(jnp.asarray(compute), jnp.asarray(comm),
                     None if available is None else _check_table(available, num_clients),
                     jnp.float32(bin_s), jnp.float32(jitter))


def _check_table(table, num_clients: int) -> jax.Array:
  table = jnp.asarray(table, bool)
  if table.ndim != 2 or table.shape[0] != num_clients:
    raise ValueError(f"availability must be [num_clients={num_clients}, bins], got "
                     f"{table.shape}.")
  return table


# Availability tables [N, G].

def diurnal(key, num_clients: int, bins: int = 24, duty: float = 0.5) -> jax.Array:
  """Each client is on for a ``duty`` fraction of every period, from a random phase."""
  if not 0 < duty <= 1:
    raise ValueError(f"diurnal duty must be in (0, 1], got {duty}.")
  phase = jax.random.uniform(key, (num_clients, 1))
  position = (jnp.arange(bins)[None, :] / bins + phase) % 1.0
  return position < duty


def markov(key, num_clients: int, bins: int, p_off: float, p_on: float) -> jax.Array:
  """Two-state chains: an on client goes off with ``p_off`` per bin, an off one on with
  ``p_on``; the first bin is drawn from the stationary law ``p_on / (p_on + p_off)``."""
  for name, p in (("p_off", p_off), ("p_on", p_on)):
    if not 0 <= p <= 1:
      raise ValueError(f"markov {name} must be in [0, 1], got {p}.")
  if p_on + p_off == 0:
    raise ValueError("markov needs p_on + p_off > 0.")
  k0, k1 = jax.random.split(key)
  state = jax.random.uniform(k0, (num_clients,)) < p_on / (p_on + p_off)

  def step(on, u):
    on = jnp.where(on, u >= p_off, u < p_on)
    return on, on

  _, rest = jax.lax.scan(step, state, jax.random.uniform(k1, (bins - 1, num_clients)))
  return jnp.concatenate([state[None], rest]).T


def windows(path: str, num_clients: int, bin_s: float) -> np.ndarray:
  """A table from a CSV ``client_id, start_s, end_s`` of on-windows (repeated after the last)."""
  rows = []
  with open(path) as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or row[0].strip().startswith("#"):
        continue
      try:
        rows.append((int(row[0]), float(row[1]), float(row[2])))
      except (ValueError, IndexError):
        if line == 1:
          continue
        raise ValueError(f"{path}:{line}: expected 'client_id, start_s, end_s', got {row!r}.") from None
  if not rows:
    raise ValueError(f"{path}: no availability windows.")
  bins = int(np.ceil(max(end for _, _, end in rows) / bin_s))
  table = np.zeros((num_clients, max(bins, 1)), bool)
  for client, start, end in rows:
    if not 0 <= client < num_clients:
      raise ValueError(f"{path}: client_id {client} is outside [0, {num_clients}).")
    table[client, int(start // bin_s):int(np.ceil(end / bin_s))] = True
  return table


def durations(system: SystemModel, clients: jax.Array, steps: jax.Array, key=None) -> jax.Array:
  """Seconds from download to upload of ``clients`` running ``steps`` local steps."""
  seconds = system.comm_s[clients] + steps.astype(jnp.float32) * system.compute_s_per_step[clients]
  if key is not None:
    seconds = seconds * jnp.exp(system.jitter * jax.random.normal(key, jnp.shape(clients)))
  return seconds


def available_at(system: SystemModel, time: jax.Array) -> jax.Array:
  """bool ``[N]``: who is available at ``time``."""
  if system.available is None:
    return jnp.ones((system.num_clients,), bool)
  bins = system.available.shape[1]
  b = jnp.floor(time / system.bin_s).astype(jnp.int32) % bins
  return system.available[:, b]


def next_start(system: SystemModel, time: jax.Array, free: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(start, candidates)``: the first time ``>= time`` at which a ``free`` client is
  available, and who is then. ``start`` is inf when none ever is."""
  if system.available is None:
    return time, free
  bins = system.available.shape[1]
  b0 = jnp.floor(time / system.bin_s).astype(jnp.int32)
  ahead = (b0 + jnp.arange(bins)) % bins
  usable = system.available[:, ahead] & free[:, None]        # [N, G]
  any_bin = jnp.any(usable, axis=0)
  k = jnp.argmax(any_bin)
  start = jnp.where(k == 0, time, (b0 + k).astype(jnp.float32) * system.bin_s)
  start = jnp.where(jnp.any(any_bin), start, jnp.inf)
  return start, usable[:, k]
