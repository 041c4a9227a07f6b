"""Delta-LoRA fine-tuning for JAX, Flax and optax.

The public names are re-exported here; the modules are:

* :mod:`deltalora_jax.core`: the pure math (forward, merge, checks), no Flax;
* :mod:`deltalora_jax.projections`: the layer kinds an adapter sits on (dense,
  dense-general, einsum, convolution) as pure math, no Flax;
* :mod:`deltalora_jax.linen`: :class:`DeltaLoRADense` and :class:`DeltaLoRAGeneral`,
  the Linen layers;
* :mod:`deltalora_jax.nnx`: :class:`DeltaLoRALinear` and :class:`DeltaLoRALinearGeneral`,
  the NNX layers, :class:`DeltaParam` and :class:`PaperSnapshot`;
* :mod:`deltalora_jax.config`: :class:`~deltalora_jax.config.LayerConfig`, an
  adapted layer's kind and options, and its one JSON encoding;
* :mod:`deltalora_jax.paths`: layer paths and their names ``'a/b/c'``;
* :mod:`deltalora_jax.adapt`: adapt an existing Linen or NNX model by target,
  export and re-attach the adapter;
* :mod:`deltalora_jax.optim`: the optax transformations of the delta rule;
* :mod:`deltalora_jax.paper`: :func:`paper_delta_lora`, the published rule
  (Zi et al., 2023);
* :mod:`deltalora_jax.sharding`: partition rules and shardings for a device mesh;
* :mod:`deltalora_jax.checkpoint`: checkpoints of the whole training state (orbax);
* :mod:`deltalora_jax.tree`: whole-model utilities (count, flatten, merge,
  reset, diagnostics);
* :mod:`deltalora_jax.pretrained`: :func:`load_base`, pretrained weights into an
  adapted model, by name (strict or not, renamed by a mapping).
"""

from deltalora_jax import config, paths, projections
from deltalora_jax.adapt import (
  DeltaLoRAModel,
  adapt_linen,
  adapt_nnx,
  attach_adapter_linen,
  attach_adapter_nnx,
  export_adapter,
  load_peft,
  save_peft,
)
from deltalora_jax.checkpoint import (
  CheckpointMismatchError,
  TrainingCheckpointer,
  layer_hyperparameters,
)
from deltalora_jax.core import delta_lora_apply, lora_scaling, merged_kernel
from deltalora_jax.linen import DeltaLoRADense, DeltaLoRAGeneral
from deltalora_jax.nnx import (
  DeltaLoRALinear,
  DeltaLoRALinearGeneral,
  DeltaParam,
  LayerDescription,
  PaperSnapshot,
  register_projection,
)
from deltalora_jax.optim import (
  Label,
  ScaleByDeltaMomentumState,
  delta_lora,
  delta_momentum,
  leaf_labels,
  reset_velocity,
  scale_by_delta_momentum,
  velocity,
)
from deltalora_jax.paper import PaperDeltaLoRAState, paper_delta_lora
from deltalora_jax.pretrained import load_base
from deltalora_jax.sharding import (
  batch_sharding,
  bytes_per_device,
  follow_shardings,
  make_mesh,
  optimizer_shardings,
  partition_specs,
  variable_shardings,
)
from deltalora_jax.tree import (
  adapted_layers,
  current_delta,
  diagnostics,
  flatten_parameters,
  merge,
  parameter_counts,
  quantize_base,
  reset,
  unflatten_parameters,
)

__version__ = "0.1.0"

__all__ = [
  "CheckpointMismatchError",
  "DeltaLoRADense",
  "DeltaLoRAGeneral",
  "DeltaLoRALinear",
  "DeltaLoRALinearGeneral",
  "DeltaLoRAModel",
  "DeltaParam",
  "Label",
  "LayerDescription",
  "PaperDeltaLoRAState",
  "PaperSnapshot",
  "ScaleByDeltaMomentumState",
  "TrainingCheckpointer",
  "adapt_linen",
  "adapt_nnx",
  "adapted_layers",
  "attach_adapter_linen",
  "attach_adapter_nnx",
  "batch_sharding",
  "bytes_per_device",
  "config",
  "current_delta",
  "delta_lora",
  "delta_lora_apply",
  "delta_momentum",
  "diagnostics",
  "export_adapter",
  "flatten_parameters",
  "follow_shardings",
  "layer_hyperparameters",
  "leaf_labels",
  "load_base",
  "load_peft",
  "lora_scaling",
  "make_mesh",
  "merge",
  "merged_kernel",
  "optimizer_shardings",
  "paper_delta_lora",
  "parameter_counts",
  "partition_specs",
  "paths",
  "projections",
  "quantize_base",
  "register_projection",
  "reset",
  "reset_velocity",
  "save_peft",
  "scale_by_delta_momentum",
  "unflatten_parameters",
  "variable_shardings",
  "velocity",
]
