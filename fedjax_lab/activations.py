"""Layer-input capture for flax linen models, without changing the model code.

Gradient-projection methods (GPM, FOT) need, for every dense or convolutional layer,
the matrix of that layer's inputs whose rows live in the space the kernel acts on:

* ``nn.Dense`` with kernel ``[d, out]``: the input rows ``[n, d]``.
* ``nn.Conv`` with kernel ``[*window, c_in, c_out]``: every receptive field (im2col
  patch) flattened in the kernel's C order ``(*window, c_in)``, so that
  ``conv(x, W) == patches(x) @ W.reshape(-1, c_out)`` row by row, and a basis of the
  patches acts on the reshaped kernel.

Inputs are recorded with ``flax.linen.intercept_methods`` around any call that applies
the model, so the same function serves MLPs, CNNs and ResNets. Layers are named by
the path of their kernel in the variables, e.g. ``'params/Dense_0/kernel'``.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def kernel_path(module_path: tuple) -> str:
  """``('Block_0', 'Dense_1') -> 'params/Block_0/Dense_1/kernel'``."""
  return "/".join(("params",) + tuple(module_path) + ("kernel",))


def _lax_padding(padding, num_spatial: int):
  """Flax's padding argument as lax takes it (strings SAME/VALID or explicit pairs)."""
  if isinstance(padding, str):
    if padding.upper() in ("SAME", "VALID"):
      return padding.upper()
    raise ValueError(f"Patch extraction supports padding 'SAME', 'VALID' or explicit sizes, "
                     f"got {padding!r}.")
  if isinstance(padding, int):
    return [(padding, padding)] * num_spatial
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else tuple(p))
  if len(pads) != num_spatial:
    raise ValueError(f"padding {padding!r} does not match {num_spatial} spatial dims.")
  return pads


def _tuple(value, n: int):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """im2col patches of ``x`` for the conv ``module``, in the kernel's flattening order.

  Args:
    module: a bound or unbound ``nn.Conv`` (its window, strides, padding, dilations).
    x: ``[n, *spatial, c_in]``.

  Returns:
    ``[n, *out_spatial, prod(window) * c_in]`` whose last axis is ordered like
    ``kernel.reshape(-1, c_out)``: ``(*window, c_in)`` in C order.
  """
  window = tuple(module.kernel_size)
  ns = len(window)
  if ns not in _SPATIAL:
    raise ValueError(f"conv_patches supports 1-3 spatial dims, got kernel_size={window}.")
  if module.feature_group_count != 1:
    raise ValueError("conv_patches needs feature_group_count == 1 (grouped convolutions "
                     "have one kernel per group).")
  if x.ndim != ns + 2:
    raise ValueError(f"Expected input [n, *spatial({ns}), c_in], got shape {x.shape}.")
  spec = "N" + _SPATIAL[ns] + "C"
  patches = lax.conv_general_dilated_patches(
      x, window, _tuple(module.strides, ns), _lax_padding(module.padding, ns),
      lhs_dilation=_tuple(module.input_dilation, ns),
      rhs_dilation=_tuple(module.kernel_dilation, ns),
      dimension_numbers=(spec, _SPATIAL[ns] + "IO", spec))
  # lax orders the patch features (c_in, *window); the kernel reshape wants (*window, c_in).
  c_in = x.shape[-1]
  out_shape = patches.shape[:-1]
  patches = patches.reshape(out_shape + (c_in, int(np.prod(window))))
  patches = jnp.swapaxes(patches, -1, -2)
  return patches.reshape(out_shape + (int(np.prod(window)) * c_in,))


def capture_layer_inputs(apply_fn: Callable, *args,
                         layers: Optional[set] = None) -> tuple[object, dict]:
  """Runs ``apply_fn(*args)`` and records the inputs of its Dense and Conv layers.

  Args:
    apply_fn: e.g. ``model.apply`` (a linen ``apply``); may be jitted by the caller.
    *args: its arguments, e.g. ``(params, x)`` with ``x [n, ...]``.
    layers: kernel paths to record (None: all Dense and Conv layers).

  Returns:
    ``(output, inputs)``: ``inputs[kernel_path]`` is ``[n, rows_per_example, d]``: one
    row for a Dense layer (its input flattened over any extra batch axes), the output
    positions for a Conv layer (patches). A layer called several times keeps its first
    call.
  """
  records = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      name = kernel_path(module.path)
      if (layers is None or name in layers) and name not in records:
        x = call_args[0]
        if isinstance(module, nn.Conv):
          p = conv_patches(module, x)
          records[name] = p.reshape(p.shape[0], -1, p.shape[-1])
        else:
          records[name] = x.reshape(x.shape[0], -1, x.shape[-1])
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    out = apply_fn(*args)
  return out, records


def layer_input_rows(apply_fn: Callable, params, x: jax.Array, mask: Optional[jax.Array] = None,
                     layers: Optional[set] = None) -> dict:
  """The activation matrices ``A_l [n * rows_per_example, d_l]`` of each layer.

  Rows of examples with ``mask == False`` are zero, so they add nothing to ``A^T A``,
  to the span of ``A`` or to its Frobenius norm.
  """
  _, records = capture_layer_inputs(apply_fn, params, x, layers=layers)
  out = {}
  for name, rows in records.items():
    if mask is not None:
      rows = jnp.where(mask[:, None, None], rows, 0)
    out[name] = rows.reshape(-1, rows.shape[-1])
  return out
