"""The Linen wrapper computes exactly what the NNX layer computes with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from moejax import moe
from moejax.moe import MoEConfig, MoELayer

CFG = MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", capacity_factor=0.75)


class LinenBlock(nn.Module):
  """A Linen user's residual FFN block with the moejax layer inside."""

  @nn.compact
  def __call__(self, x, mask=None, deterministic=False):
    y, aux = moe.as_linen(CFG, x.shape[-1], name="moe")(x, mask, deterministic=deterministic)
    return x + y, aux


def test_linen_wrapper_matches_nnx_layer():
  x = jax.random.normal(jax.random.key(0), (2, 9, 5))
  mask = jnp.ones((2, 9), bool).at[1, 6:].set(False)
  block = LinenBlock()
  variables = block.init({"params": jax.random.key(1), "routing": jax.random.key(2)}, x)
  params = nn.unbox(variables)["params"]["moe"]
  assert params["w_up_EDF"].shape == (4, 5, 6)
  (out, aux), _ = block.apply(variables, x, mask, deterministic=True,
                               rngs={"routing": jax.random.key(3)}, mutable=True)

  layer = MoELayer(CFG, 5, rngs=nnx.Rngs(0))
  for name in ("router_DE", "w_up_EDF", "w_down_EFD"):
    getattr(layer, name)[...] = params[name]
  y, nnx_aux = layer(x, mask, deterministic=True)
  np.testing.assert_allclose(out, x + y, rtol=1e-6)
  np.testing.assert_allclose(aux.loss, nnx_aux.loss, rtol=1e-6)
  # Gradients flow to the Linen params.
  grads = jax.grad(lambda v: jnp.sum(block.apply(v, x, mask, deterministic=True,
                                                 mutable=True)[0][0] ** 2))(variables)
  assert float(jnp.linalg.norm(nn.unbox(grads)["params"]["moe"]["router_DE"])) > 0


def test_linen_training_mode_uses_the_apply_rngs_and_refuses_to_run_without_them():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", router_jitter=0.3,
                  second_expert_policy="random")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=False):
      return moe.as_linen(cfg, x.shape[-1], name="moe")(x, None, deterministic=deterministic)

  x = jax.random.normal(jax.random.key(0), (2, 9, 5))
  block = Block()
  variables = block.init({"params": jax.random.key(1), "routing": jax.random.key(2)}, x)
  train = lambda key: block.apply(variables, x, rngs={"routing": key}, mutable=True)[0][0]  # noqa
  np.testing.assert_array_equal(train(jax.random.key(5)), train(jax.random.key(5)))
  assert not np.allclose(train(jax.random.key(5)), train(jax.random.key(6)))
  with np.testing.assert_raises_regex(ValueError, r"needs rngs \['routing'\]"):
    block.apply(variables, x, mutable=True)
  # Eval needs no RNG and is deterministic.
  eval_y = block.apply(variables, x, True, mutable=True)[0][0]
  np.testing.assert_array_equal(eval_y, block.apply(variables, x, True, mutable=True)[0][0])
