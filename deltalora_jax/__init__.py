"""Delta-LoRA fine-tuning for JAX, Flax and optax.

The public names are re-exported here; the modules are:

* :mod:`deltalora_jax.core`: the pure math (forward, merge, checks), no Flax;
* :mod:`deltalora_jax.linen`: :class:`DeltaLoRADense`, the Linen layer;
* :mod:`deltalora_jax.optim`: the optax transformations of the delta rule;
* :mod:`deltalora_jax.paper`: :func:`paper_delta_lora`, the published rule
  (Zi et al., 2023);
* :mod:`deltalora_jax.tree`: whole-model utilities (count, flatten, merge,
  reset, diagnostics, load pretrained weights).
"""

from deltalora_jax.core import delta_lora_dense, lora_scaling, merged_kernel
from deltalora_jax.linen import DeltaLoRADense
from deltalora_jax.optim import (
    ScaleByDeltaMomentumState,
    delta_lora,
    delta_momentum,
    leaf_labels,
    reset_velocity,
    scale_by_delta_momentum,
    velocity,
)
from deltalora_jax.paper import PaperDeltaLoRAState, paper_delta_lora
from deltalora_jax.tree import (
    adapted_layers,
    current_delta,
    diagnostics,
    flatten_parameters,
    load_base,
    merge,
    parameter_counts,
    reset,
    unflatten_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "DeltaLoRADense",
    "PaperDeltaLoRAState",
    "ScaleByDeltaMomentumState",
    "adapted_layers",
    "current_delta",
    "delta_lora",
    "delta_lora_dense",
    "delta_momentum",
    "diagnostics",
    "flatten_parameters",
    "leaf_labels",
    "load_base",
    "lora_scaling",
    "merge",
    "merged_kernel",
    "paper_delta_lora",
    "parameter_counts",
    "reset",
    "reset_velocity",
    "scale_by_delta_momentum",
    "unflatten_parameters",
    "velocity",
]
