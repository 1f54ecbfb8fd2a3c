"""Small shared type aliases."""
from typing import Any, Mapping

import jax

Params = Any            # a pytree of arrays (flax variables, a dict, ...)
PyTree = Any
PRNGKey = jax.Array     # raw uint32[2] keys, so server state checkpoints as plain arrays
Batch = Mapping[str, jax.Array]   # e.g. {'x': [B, ...], 'y': [B], 'mask': [B]}
Metrics = Mapping[str, jax.Array]
