"""moejax.causal: the causal evaluation equals teacher forcing exactly for causal-safe routing, and
exposes the leak of batch-prioritized, choice-major top-2, expert-choice and rerouting policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import causal
from moejax.model import Transformer, TransformerConfig

B, L, V = 3, 24, 37


def _model(**moe):
  cfg = TransformerConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                          moe_every=1, moe=dict(num_experts=4, d_ff=8, eval_capacity_factor=0.5,
                                                **moe))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def _batch():
  tokens = jax.random.randint(jax.random.key(1), (B, L + 1), 0, V)
  mask = jnp.ones((B, L), bool).at[2, 20:].set(False)  # a padded tail
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
          "segment_ids": jnp.ones((B, L), jnp.int32).at[0, 12:].set(2),  # two documents in row 0
          "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}


@pytest.mark.parametrize("moe", [
    dict(top_k=1, priority="position"),
    dict(top_k=2, gate="gshard", priority="token"),
    dict(top_k=1, priority="token"),
], ids=["k1-position", "k2-token", "k1-token"])
def test_causal_safe_policies_have_no_leak(moe):
  result = causal.causal_vs_teacher_forced(_model(**moe), _batch(), jnp.arange(L))
  np.testing.assert_allclose(result["causal_TB"], result["teacher_forced_TB"], atol=2e-5)
  assert abs(causal.leak_nats(result)["leak"]) < 1e-5


@pytest.mark.parametrize("moe", [
    dict(top_k=1, priority="probability"),
    dict(top_k=2, gate="gshard", priority="position"),
    dict(top_k=1, choice="expert", capacity_factor=0.5),
    dict(top_k=1, overflow="reroute"),
], ids=["k1-bpr", "k2-choice-major", "expert-choice", "k1-reroute"])
def test_leaky_policies_differ_from_teacher_forcing(moe):
  result = causal.causal_vs_teacher_forced(_model(**moe), _batch(), jnp.arange(L))
  diff = np.abs(np.asarray(result["causal_TB"] - result["teacher_forced_TB"]))
  assert diff.max() > 1e-3  # At CF 0.5 the future takes slots the past wanted (or frees them).
  # The last position sees the whole row either way: no leak there.
  np.testing.assert_allclose(diff[-1], 0.0, atol=2e-5)
