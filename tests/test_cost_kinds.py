"""Structural cost of the training step for every layer kind: XLA's flop counts, no timing.

Each kind is a small stack of Flax's own layers (attention's multi-axis
``nn.DenseGeneral`` projections, ``nn.Einsum`` with and without a batch axis,
1-D and 2-D ``nn.Conv``), adapted with :func:`deltalora_jax.adapt_linen` at
rank 8 and trained one step; every layer sees at least 512 rows (output
positions). The seed rule is held to full fine-tuning of the same layers,
the paper's rule to plain LoRA on them.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import deltalora_jax as dl

RANK = 8
LR = 1e-2


class _Stack(nn.Module):
  """Flax's own layers of one kind, ReLU between them."""

  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "general_dense":  # attention's query and output projections
      layers = [
        nn.DenseGeneral((4, 32), name="query"),  # kernel [d, heads, head_dim]
        nn.DenseGeneral(128, axis=(-2, -1), name="out"),  # kernel [heads, head_dim, d]
      ]
    elif self.kind == "einsum":
      layers = [
        nn.Einsum((128, 4, 32), "btd,dnh->btnh", name="query"),
        nn.Einsum((4, 32, 32), "btnh,nhk->btnk", name="per_head"),  # n: a batch axis
        nn.Einsum((4, 32, 128), "btnh,nhd->btd", name="out"),
      ]
    elif self.kind == "conv1d":
      layers = [nn.Conv(64, (3,), name=f"conv_{i}") for i in range(2)]
    else:
      layers = [nn.Conv(32, (3, 3), name=f"conv_{i}") for i in range(2)]
    for i, layer in enumerate(layers):
      x = layer(x)
      if i < len(layers) - 1:
        x = nn.relu(x)
    return x


# {case: (kind, input shape)}; every layer of a case sees the same number of rows.
SHAPES = {
  "general_dense": ("general_dense", (4, 128, 128)),  # 512 rows
  "einsum": ("einsum", (4, 128, 128)),  # 512 rows
  "conv1d": ("conv1d", (4, 128, 64)),  # 512 output positions
  "conv2d": ("conv2d", (4, 16, 16, 32)),  # 1024 output positions
  "conv2d_512": ("conv2d", (2, 16, 16, 32)),  # 512 output positions
}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost["flops"])


def _step_flops(apply, variables, tx, x, y) -> float:
  def step(variables, opt_state, x, y):
    def loss_fn(v):
      return jnp.mean(jnp.square(apply(v, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  # optax.adamw's bias correction mixes a Python float with its int32 count,
  # which strict promotion refuses; a user runs with the standard mode.
  with jax.numpy_dtype_promotion("standard"):
    return _flops(jax.jit(step).lower(variables, tx.init(variables), x, y).compile())


@functools.cache
def _case(case: str):
  kind, shape = SHAPES[case]
  model = _Stack(kind)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  variables = model.init(kp, x)
  y = jax.random.normal(ky, jax.eval_shape(model.apply, variables, x).shape)
  return model, variables, x, y


def _kernel_sizes(variables) -> list[int]:
  return [
    leaf.size
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    if path[-1].key == "kernel"
  ]


@functools.cache
def _flops_of(case: str, variant: str) -> float:
  """Flops of one training step of ``variant`` on ``case``."""
  model, variables, x, y = _case(case)
  if variant == "full":  # Flax's own layers, every parameter trained
    return _step_flops(model.apply, variables, optax.sgd(LR, momentum=0.9), x, y)
  adapted, new, _ = dl.adapt_linen(
    model, variables, x, rank=RANK, use_delta=variant == "seed", key=jax.random.key(1)
  )
  if variant == "seed":  # frozen base, merged evaluation ('auto' with D)
    tx = dl.delta_lora(LR, layers=adapted, lora_optimizer=optax.sgd(LR))
  elif variant == "lora":  # factors trained, base frozen, factored evaluation
    tx = optax.multi_transform(
      {"lora": optax.adamw(LR), "base": optax.set_to_zero(), "other": optax.set_to_zero()},
      dl.leaf_labels,
    )
  else:
    tx = dl.paper_delta_lora(LR, layers=adapted, start_step=0)
  return _step_flops(adapted.apply, new, tx, x, y)


_BOUNDARY = pytest.mark.xfail(
  strict=True,
  reason=(
    "1.021: XLA counts only the taps of a 'SAME' 3x3 convolution that fall inside the "
    "16x16 map (92%), so each product costs 470 rows' worth while the low-rank extras "
    "(6 K r a layer) do not shrink; 2 layers hold 1.02 from about 560 output positions"
  ),
)


@pytest.mark.parametrize(
  "case",
  ["general_dense", "einsum", "conv1d", "conv2d", pytest.param("conv2d_512", marks=_BOUNDARY)],
)
def test_seed_step_within_1_02_of_full_fine_tuning(case):
  # Full fine-tuning's forward, input and weight gradients, plus forming A B
  # and dA, dB from the weight gradient that D needs anyway: 6 K r a layer.
  ratio = _flops_of(case, "seed") / _flops_of(case, "full")
  assert 1.0 <= ratio <= 1.02


@pytest.mark.parametrize("case", list(SHAPES))
def test_seed_step_extra_is_the_low_rank_products(case):
  # Beyond full fine-tuning, the seed step forms A B and takes dA = dM B^T,
  # dB = A^T dM from the weight gradient dM: 6 K r flops a layer of kernel
  # size K. The rest (the merge, the velocity, less the biases' gradients)
  # is element-wise: far under one product of the data's size.
  full = _flops_of(case, "full")
  low_rank = sum(6 * k * RANK for k in _kernel_sizes(_case(case)[1]))
  assert _flops_of(case, "seed") - full <= low_rank + 0.005 * full


@pytest.mark.parametrize("case", ["general_dense", "einsum", "conv1d", "conv2d_512"])
def test_paper_step_within_1_15_of_plain_lora(case):
  # The rule adds the change of A B to each kernel: a few low-rank products.
  lora, paper = _flops_of(case, "lora"), _flops_of(case, "paper")
  assert lora < paper <= 1.15 * lora
