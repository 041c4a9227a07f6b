"""Adapt a model that was not written for this library, and trade its adapter.

* :mod:`~deltalora_jax.adapt.targets`: which layers ``targets`` chooses, and
  the report of what was adapted;
* :mod:`~deltalora_jax.adapt.nnx`: :func:`adapt_nnx` replaces the chosen
  layers of an NNX model by adapters, in place;
* :mod:`~deltalora_jax.adapt.linen`: :func:`adapt_linen` wraps a Linen model
  in a :class:`DeltaLoRAModel` that runs its chosen layers adapted;
* :mod:`~deltalora_jax.adapt.files`: :func:`export_adapter` splits the
  trained adapter from the base; :func:`attach_adapter_nnx` and
  :func:`attach_adapter_linen` put it back on a fresh copy of the base.
* :mod:`~deltalora_jax.adapt.peft`: :func:`save_peft` writes the adapter as a
  Hugging Face PEFT LoRA directory (or merged PyTorch weights);
  :func:`load_peft` reads one back into the adapter format above.

:func:`deltalora_jax.merge` turns an adapted model back into its base
architecture with merged kernels.
"""

from deltalora_jax.adapt.files import attach_adapter_linen, attach_adapter_nnx, export_adapter
from deltalora_jax.adapt.linen import DeltaLoRAModel, adapt_linen
from deltalora_jax.adapt.nnx import adapt_nnx
from deltalora_jax.adapt.peft import load_peft, save_peft
from deltalora_jax.adapt.targets import format_report, select_targets

__all__ = [
  "DeltaLoRAModel",
  "adapt_linen",
  "adapt_nnx",
  "attach_adapter_linen",
  "attach_adapter_nnx",
  "export_adapter",
  "format_report",
  "load_peft",
  "save_peft",
  "select_targets",
]
