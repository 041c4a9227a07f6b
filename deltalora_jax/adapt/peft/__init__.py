"""Hugging Face PEFT LoRA adapter directories: write them, and read them back.

A PEFT LoRA directory holds ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with, for each adapted PyTorch module ``m``,
``base_model.model.<m>.lora_A.weight`` and ``.lora_B.weight``. PEFT adds
``scaling * lora_B(lora_A(x))`` to the module's output, ``scaling =
lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

* :func:`save_peft` writes the adapted layers of an NNX model (or of Linen
  variables with their ``layers``) as such a directory, by one of three rules:
  ``'lora'`` (plain LoRA layers, ``use_delta=False``: exact), ``'paper'``
  (the published Delta-LoRA rule: the change ``W_T + s A_T B_T - W_0`` of
  rank at most ``2r``, written at rank ``2r``), ``'seed'`` (``s A B + ds D``,
  full rank: its rank-``k`` truncated SVD, or the merged weights);
* :func:`load_peft` reads one into this library's adapter format (that of
  :func:`~deltalora_jax.export_adapter`, ``use_delta=False``), which
  :func:`~deltalora_jax.attach_adapter_nnx` and
  :func:`~deltalora_jax.attach_adapter_linen` put on the base model.

Nothing here imports PyTorch: the files are written and read with
``safetensors.numpy``; a pickled ``adapter_model.bin`` is refused, never read.

Layer names. ``module_names`` maps this library's layer names ``'a/b'`` to
the PyTorch module names (``'model.layers.0.self_attn.q_proj'``): a mapping
(only the layers it names are written or read) or a callable.

Layouts (Flax kernels multiply from the left, PyTorch weights from the right):

=========================  ========================  ================================
Flax layer (kernel)        PyTorch module            ``lora_A.weight`` / ``lora_B.weight``
=========================  ========================  ================================
Dense ``[in, out]``        ``nn.Linear``             ``[r, in]`` = ``A.T`` / ``[out, r]`` = ``B.T``
DenseGeneral               ``nn.Linear``             ``[r, prod(in)]`` / ``[prod(out), r]``
``[*in, *features]``
Einsum, no batch axis      ``nn.Linear``             as DenseGeneral, axes in the kernel's order
Conv ``[*win, in, out]``   ``nn.Conv{1,2,3}d``       ``[r, in, *win]`` / ``[out, r, 1, ...]``
=========================  ========================  ================================

A DenseGeneral's (or Einsum's) several input axes are flattened in
row-major order, the contracted kernel axes in the kernel's order (the
order they have in the input), and so are its output axes: the PyTorch
``nn.Linear`` whose ``weight [out, in]`` is the Flax kernel reshaped to
``[prod(in), prod(out)]`` and transposed. A convolution's kernel is
transposed (PyTorch's ``[out, in, *win]``), not flipped: both frameworks
correlate. An Einsum with batch axes (its own factors per index), a layer
stacked by ``nn.scan``/``nnx.vmap`` and a kernel of another kind have no
PEFT module and are refused by name.

Example:
  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import deltalora_jax as dl
  >>> names = {"up": "mlp.up_proj"}  # Flax layer name -> PyTorch module name
  >>> model = nnx.Dict(up=nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  >>> model, _ = dl.adapt_nnx(model, rank=2, use_delta=False, rngs=nnx.Rngs(1))
  >>> model["up"].lora_b[...] = jnp.ones((2, 8))  # as if trained
  >>> directory = tempfile.mkdtemp()
  >>> report = save_peft(directory, model, module_names=names)
  >>> report["layers"]["up"]["module"], report["layers"]["up"]["rank"]
  ('mlp.up_proj', 2)
  >>> fresh = nnx.Dict(up=nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
  >>> fresh, _ = dl.attach_adapter_nnx(fresh, load_peft(directory, fresh, module_names=names))
  >>> x = jnp.ones((1, 4))
  >>> bool(jnp.allclose(fresh["up"](x), model["up"](x), rtol=1e-6))
  True
"""

from deltalora_jax.adapt.peft.export import save_peft
from deltalora_jax.adapt.peft.layout import (
  CONFIG_FILE,
  LORA_CONFIG_DEFAULTS,
  MERGED_FILE,
  PICKLE_FILE,
  PREFIX,
  RULES,
  UNSUPPORTED,
  WEIGHTS_FILE,
  ModuleName,
  ModuleNames,
  Rule,
)
from deltalora_jax.adapt.peft.load import load_peft

__all__ = [
  "CONFIG_FILE",
  "LORA_CONFIG_DEFAULTS",
  "MERGED_FILE",
  "PICKLE_FILE",
  "PREFIX",
  "RULES",
  "UNSUPPORTED",
  "WEIGHTS_FILE",
  "ModuleName",
  "ModuleNames",
  "Rule",
  "load_peft",
  "save_peft",
]
