"""Compressed communication from a config (``fedjax_lab.compression``).

``apply_compression(method, config)`` reads these keys, which ``launch/configs/shared.py``
adds to every ``launch.train`` config (``compression='none'``: the method unchanged):

==============================  ==========================================================
key (default)                   meaning
==============================  ==========================================================
``compression`` (``none``)      uplink compressor: ``none``, one of ``COMPRESSORS``
``compression_bits`` (4)        ``qsgd`` / ``rotated``: bits per entry
``compression_fraction`` (0.01) ``top_k`` / ``random_k`` / ``fedzip``: share kept
``compression_norm`` (l2)     ``qsgd``: ``l2`` (eq. 1) or ``linf`` (uniform quantisation)
``compression_bucket`` (128)    ``qsgd``: bucket size (None: each layer whole)
``compression_clusters`` (3)    ``fedzip``: k-means centroids
``compression_keys``            message entries compressed, comma-separated
(``delta``)                     (SCAFFOLD: ``delta,control_delta``)
``error_feedback`` (False)      keep each client's residual (``error_feedback_kind``)
``error_feedback_kind`` (ef)    ``ef`` or ``ef21``
``downlink_compression``        broadcast compressor (same names and options); ``none``
(``none``)
==============================  ==========================================================

``identity`` compresses nothing but counts the bits (32 per float). The summary of a
run with compression gets ``report``'s totals (``uplink_bits``, ``downlink_bits``, their
uncompressed counts, ``uplink_bytes_per_client_round``, ...).
"""
from typing import Optional

from fedjax_lab import compression
from fedjax_lab.algorithm import FederatedAlgorithm, ServerState
from launch.configs import shared

COMPRESSORS = ("identity", "top_k", "random_k", "sign", "sign_vote", "qsgd", "rotated",
               "fedzip")
_DEFAULTS = shared.compression_defaults()


def _get(config, key):
  value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
  return _DEFAULTS[key] if value is None and key in _DEFAULTS else value


def make_compressor(name: str, config) -> Optional[compression.Compressor]:
  """The compressor ``name`` with its options from ``config`` (None for ``'none'``)."""
  if name == "none":
    return None
  if name == "identity":
    return compression.identity()
  if name == "top_k":
    return compression.top_k(float(_get(config, "compression_fraction")))
  if name == "random_k":
    return compression.random_k(float(_get(config, "compression_fraction")))
  if name in ("sign", "sign_vote"):
    return compression.sign(vote=name == "sign_vote")
  if name == "qsgd":
    return compression.qsgd(int(_get(config, "compression_bits")), _get(config, "compression_norm"),
                            _get(config, "compression_bucket"))
  if name == "rotated":
    return compression.rotated(int(_get(config, "compression_bits")))
  if name == "fedzip":
    return compression.fedzip(float(_get(config, "compression_fraction")),
                              int(_get(config, "compression_clusters")))
  raise ValueError(f"Unknown compression {name!r}; choose none or one of {', '.join(COMPRESSORS)}.")


def apply_compression(method: FederatedAlgorithm, config) -> FederatedAlgorithm:
  """``method`` with the config's uplink / downlink compression; unchanged when both are
  ``'none'``."""
  uplink = make_compressor(_get(config, "compression"), config)
  downlink = make_compressor(_get(config, "downlink_compression"), config)
  error_feedback = _get(config, "error_feedback")
  kind = _get(config, "error_feedback_kind")
  if kind not in compression.EF_KINDS:
    raise ValueError(f"Unknown error_feedback_kind {kind!r}; choose one of "
                     f"{', '.join(compression.EF_KINDS)}.")
  if uplink is None and downlink is None:
    if error_feedback:
      raise ValueError("error_feedback=True needs a compressor: set compression.")
    return method
  keys = tuple(k.strip() for k in _get(config, "compression_keys").split(",") if k.strip())
  return compression.compressed(
      method, uplink or compression.identity(), keys=keys,
      error_feedback=kind if error_feedback else None, downlink=downlink,
      seed=int(config.get("seed", 0)) + 104729)


def report(method: FederatedAlgorithm, state: ServerState) -> dict:
  """``compression.report(state)`` for a compressed method, ``{}`` otherwise."""
  from fedjax_lab import server_rules
  if server_rules.find_state(state.rule_state, compression.CommState) is None:
    return {}
  del method
  return compression.report(state)
