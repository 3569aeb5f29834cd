"""moejax.generate: cached decoding equals recomputing the prefix; sampling keeps its support."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import generate as gen
from moejax import sharding
from moejax.data.tokenizers import UNK_ID, ByteTokenizer
from moejax.model import Transformer, TransformerConfig

V = 37
MOE = dict(num_experts=4, top_k=2, d_ff=8, gate="gshard", eval_capacity_factor=0.5)


def _model(moe: bool | str) -> Transformer:
  """`moe`: False (dense), True (capacity experts), "dropless"."""
  experts = ({**MOE, "eval_capacity_factor": 2.0, "dispatch": "dropless"} if moe == "dropless"
             else MOE)
  cfg = TransformerConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                          d_ff=32, moe_every=1 if moe else 0, moe=experts if moe else None)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, V, n).astype(np.int32) for n in (5, 9, 3)]


def _recompute_greedy(model, prompt, steps):
  """The oracle: one prompt, no padding, the whole prefix through `__call__` at every step."""
  # Right-padded to one length (one compilation): causal attention and no-drop routing of the
  # masked padding leave the logits of the real tokens unchanged.
  forward = nnx.jit(lambda m, t_1L, mask_1L: m(t_1L, mask_BL=mask_1L, deterministic=True,
                                               moe_capacity_factor=math.inf)[0])
  tokens, logits, L = list(prompt), [], 16
  for _ in range(steps):
    n = len(tokens)
    tokens_1L = np.zeros((1, L), np.int32)
    tokens_1L[0, :n] = tokens
    last_V = np.asarray(forward(model, tokens_1L, np.arange(L)[None] < n)[0, n - 1])
    logits.append(last_V)
    tokens.append(int(np.argmax(last_V)))
  return np.asarray(tokens[len(prompt):]), np.stack(logits)


@pytest.mark.parametrize("moe", [False, True, "dropless"], ids=["dense", "moe", "dropless"])
@pytest.mark.parametrize("devices", [1, 8])
def test_cached_decoding_equals_recomputing_the_prefix(moe, devices):
  model, steps = _model(moe), 6
  expected = [_recompute_greedy(model, p, steps) for p in _prompts()]
  if devices == 1:
    out = gen.generate(model, _prompts(), max_new_tokens=steps, key=jax.random.key(0),
                       temperature=0.0, return_logits=True)
  else:  # Same parameters, replicated onto a (data=4, expert=2) mesh; 3 prompts pad to 8 rows.
    mesh = sharding.make_mesh({"data": 4, "expert": 2})
    with jax.set_mesh(mesh):
      nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())),
                                     nnx.state(model)))
      out = gen.generate(model, _prompts(), max_new_tokens=steps, key=jax.random.key(0),
                         temperature=0.0, return_logits=True)
  for i, (tokens, logits) in enumerate(expected):
    np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"prompt {i}")
    np.testing.assert_allclose(out.logits[i], logits, atol=1e-4, err_msg=f"prompt {i}")


def test_generation_stops_at_eos_and_is_seeded():
  model = _model(moe=True)
  tokens, _ = _recompute_greedy(model, _prompts()[0], 6)
  eos = int(tokens[3])
  out = gen.generate(model, _prompts()[:1], max_new_tokens=6, key=jax.random.key(0),
                     temperature=0.0, eos_id=eos)
  np.testing.assert_array_equal(out.tokens[0], tokens[:list(tokens).index(eos)])
  sample = lambda seed: gen.generate(model, _prompts(), max_new_tokens=8,
                                     key=jax.random.key(seed), temperature=1.0).tokens
  assert all((a == b).all() for a, b in zip(sample(1), sample(1)))
  assert any((a != b).any() for a, b in zip(sample(1), sample(2)))


def test_eval_capacity_factor_decoding_routes_the_batch_together():
  """At a small eval capacity factor the rows of a step compete for expert slots: a prompt's
  logits then depend on its batch-mates, which never happens at the default no-drop decoding."""
  model, prompts = _model(moe=True), _prompts()
  def first_logits(batch, capacity_factor):
    return gen.generate(model, batch, max_new_tokens=2, key=jax.random.key(0), temperature=0.0,
                        capacity_factor=capacity_factor, return_logits=True).logits[0]
  np.testing.assert_allclose(first_logits(prompts[:1], math.inf),
                             first_logits(prompts, math.inf), atol=1e-5)
  assert np.abs(first_logits(prompts[:1], None) - first_logits(prompts, None)).max() > 1e-4


PROBS = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("kwargs, support", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.75), {0, 1}),
    (dict(top_p=0.8), {0, 1}),       # 0.5 + 0.3 reaches 0.8: the third token is not needed
    (dict(top_p=0.81), {0, 1, 2}),
    (dict(top_k=3, top_p=0.99), {0, 1, 2}),
])
def test_sampling_support_and_frequencies(kwargs, support):
  logits_BV = jnp.log(jnp.asarray(np.tile(PROBS, (4000, 1)), jnp.float32))
  draws = np.asarray(gen.sample_logits(jax.random.key(0), logits_BV, temperature=1.0, **kwargs))
  assert set(np.unique(draws)) == support
  kept = PROBS[sorted(support)] / PROBS[sorted(support)].sum()
  freq = np.bincount(draws, minlength=4)[sorted(support)] / len(draws)
  np.testing.assert_allclose(freq, kept, atol=0.03)


def test_greedy_and_degenerate_sampling_pick_the_argmax():
  logits_BV = jax.random.normal(jax.random.key(0), (16, V))
  argmax = np.argmax(np.asarray(logits_BV), -1)
  for kwargs in (dict(temperature=0.0), dict(temperature=2.0, top_k=1),
                 dict(temperature=2.0, top_p=1e-6)):
    np.testing.assert_array_equal(gen.sample_logits(jax.random.key(1), logits_BV, **kwargs),
                                  argmax)


def test_prompts_are_left_padded_with_per_row_positions():
  batch = gen.pad_prompts([np.array([5, 6, 7]), np.array([8])], rows=4)
  np.testing.assert_array_equal(batch["tokens"][:2], [[5, 6, 7], [0, 0, 8]])
  np.testing.assert_array_equal(batch["segment_ids"][:2], [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(batch["positions"][:2], [[0, 1, 2], [0, 0, 0]])
  assert batch["tokens"].shape == (4, 3)


class _TinySentencePiece:
  """A SentencePiece-like tokenizer without byte fallback: letters a-z only, the rest is <unk>."""
  name, bos_id = "sentencepiece", 1

  def encode(self, text):
    return np.array([ord(c) - 90 if "a" <= c <= "z" else UNK_ID for c in text], np.int32)


@pytest.mark.parametrize("tokenizer, prompts, match", [
    (ByteTokenizer(), [], "got none"),
    (ByteTokenizer(), ["ok", ""], "prompt 1"),
    (_TinySentencePiece(), ["abc", "ab€d!"], r"prompt 1.*'!€'.*<unk>"),
])
def test_bad_prompts_are_named(tokenizer, prompts, match):
  with pytest.raises(ValueError, match=match):
    gen.encode_prompts(tokenizer, prompts)


def test_byte_prompts_start_with_bos():
  (ids,) = gen.encode_prompts(ByteTokenizer(), ["hé"])
  np.testing.assert_array_equal(ids, [1, ord("h") + 3, 0xC3 + 3, 0xA9 + 3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_len=8), "seq_len=8"),
])
def test_bad_sampling_settings_are_named(kwargs, match):
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    gen.generate(_model(moe=False), _prompts(), key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_expert_choice_models_refuse_to_decode(scan_layers):
  cfg = TransformerConfig(vocab_size=V, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                          d_ff=32, moe_every=2, scan_layers=scan_layers,
                          moe=dict(num_experts=4, top_k=2, d_ff=8, choice="expert",
                                   capacity_factor=1.0, eval_capacity_factor=1.0))
  with pytest.raises(ValueError, match=r"choice='expert'.*allowed: choice='token'"):
    gen.generate(Transformer(cfg, rngs=nnx.Rngs(0)), _prompts(), max_new_tokens=2,
                 key=jax.random.key(0))
