"""Sampling from a trained model with a KV cache.

    model, mesh, step = train.load_model(config, workdir)
    prompts = encode_prompts(tokenizer, ["def main(", "The kernel"])
    with jax.set_mesh(mesh):
      out = generate(model, prompts, max_new_tokens=64, key=jax.random.key(0), temperature=0.8,
                     top_p=0.95, eos_id=tokenizer.eos_id)
    texts = [tokenizer.decode(t) for t in out.tokens]

Design:
- Prompts are left-padded to a common length P, so every row's next token is at the same cache
  column; padding has segment id 0 (it takes no MoE capacity and no real token attends to it)
  and RoPE positions count from each row's first real token. The batch is padded with dummy rows
  to a multiple of the mesh's batch shards, and the dummy rows are discarded.
- One jitted function: a prefill `Transformer.decode` of the P prompt columns, then a
  `lax.scan` of `max_new_tokens - 1` one-token steps. The cache holds P + max_new_tokens columns.
  A row that has produced `eos_id` keeps stepping (the batch is fixed) with segment id 0, so it
  takes no MoE capacity; its later tokens are cut on the host.
- **MoE routing at decode time.** A step's routing group is the batch of current tokens: the B
  new tokens (one per row; at the prefill, the B * P prompt tokens) split evenly over the mesh's
  batch shards, one group per shard. By default the capacity is unlimited (`capacity_factor=inf`):
  no token is ever dropped, every token gets exactly its router's top-k experts, and the output of
  a row does not depend on the other rows, so cached decoding equals the full teacher-forced
  forward pass. `capacity_factor=None` uses the run's eval capacity factor instead (C from that
  factor and the group size B / shards): then rows compete for slots and what a row generates
  depends on the batch, which is what a capacity-bound MoE server does.
- Sampling (`sample_logits`): temperature 0 is greedy; otherwise logits / temperature, keep the
  top-k logits (`top_k=0`: all), then the smallest set of most probable tokens whose probability
  reaches `top_p` (nucleus; ties at the cut-off are kept), and draw.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.data.tokenizers import UNK_ID


@dataclasses.dataclass(frozen=True)
class Generation:
  """`tokens[i]`: the new tokens of prompt i (up to and without its first EOS); `logits`: the
  `[num_prompts, max_new_tokens, V]` float32 logits each sampled token was drawn from (only with
  `return_logits=True`)."""
  tokens: list[np.ndarray]
  logits: np.ndarray | None = None
  # With `record_routes=True`: every MoE layer's experts for each column the model was fed
  # ({layer: int32 [num_prompts, P + max_new_tokens - 1, K]}: the left-padded prompt, then each
  # sampled token but the last), and those columns (`tokens`, `positions`, `segment_ids`, the
  # same shape; segment id 0 = padding or after EOS). Scoring them with
  # `model(columns["tokens"], columns["positions"], columns["segment_ids"],
  # columns["segment_ids"] > 0, moe_routes=routes)` uses the experts of sampling time: its
  # logits at column P - 1 + j are those token j was drawn from (routing replay for RL) when
  # neither pass drops choices (the default no-drop sampling, and dropless or no-drop scoring)
  # and the second-expert policy is "all" (the routes are recorded before policy and capacity).
  # `gates`: the same columns' combine weights ({layer: [num_prompts, P + max_new_tokens - 1,
  # K]}); `moe_gates=gates` as well replays them and the keep decisions (then a change of the
  # routers alone moves no logit).
  routes: dict[int, np.ndarray] | None = None
  columns: dict[str, np.ndarray] | None = None
  gates: dict[int, np.ndarray] | None = None


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
  """ValueError naming the argument for a sampling setting that cannot work."""
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature={temperature}: allowed a finite number >= 0 (0 = greedy).")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k={top_k}: allowed an integer >= 0 (0 = no top-k cut).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: allowed a number in (0, 1] (1 = no nucleus cut).")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: allowed an integer >= 1.")


def sample_logits(key: jax.Array, logits_BV: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """One token per row `[B]` (int32) from `logits_BV`; see the module docstring."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a sorted token if the probability before it is still short of top_p (the first always).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[np.ndarray]:
  """`[BOS] + encode(prompt)` per prompt (how the trainer saw each document start).

  ValueError for no prompts, an empty prompt, or one with characters the tokenizer cannot
  represent (SentencePiece without byte fallback maps them to <unk>)."""
  if not prompts:
    raise ValueError("prompts: got none; allowed one or more non-empty strings.")
  out = []
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt:
      raise ValueError(f"prompt {i}: {prompt!r}; allowed a non-empty string.")
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if getattr(tokenizer, "name", "") == "sentencepiece" and (ids == UNK_ID).any():
      bad = sorted({c for c in prompt if (np.asarray(tokenizer.encode(c)) == UNK_ID).any()})
      raise ValueError(f"prompt {i}: {prompt[:40]!r} has characters {''.join(bad)!r} that the "
                       f"run's tokenizer ({getattr(tokenizer, 'model_path', 'sentencepiece')}) "
                       "maps to <unk>; allowed: text the tokenizer covers.")
    out.append(np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32))
  return out


def pad_prompts(prompts: Sequence[np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Left-pads token-id prompts to `[rows, P]`: `tokens`, `segment_ids` (1 real, 0 padding) and
  `positions` (0 at each row's first real token). Rows beyond the prompts are one-token dummies."""
  P = max(len(p) for p in prompts)
  tokens = np.zeros((rows, P), np.int32)
  segment_ids = np.zeros((rows, P), np.int32)
  for i in range(rows):
    p = prompts[i] if i < len(prompts) else prompts[0][:1]
    tokens[i, P - len(p):] = p
    segment_ids[i, P - len(p):] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def check_lengths(prompts: Sequence[np.ndarray], max_new_tokens: int,
                  max_len: int | None) -> None:
  """Raises ValueError unless there are prompts, none is empty, and the longest plus
  `max_new_tokens` fits `max_len` (the run's `seq_len`; None = no bound)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts: allowed one or more non-empty token-id arrays.")
  longest = max(len(p) for p in prompts)
  if max_len is not None and longest + max_new_tokens > max_len:
    raise ValueError(
        f"max_new_tokens={max_new_tokens} after a {longest}-token prompt is "
        f"{longest + max_new_tokens} tokens, more than the run's seq_len={max_len}; allowed: "
        f"prompt + max_new_tokens <= {max_len}.")


def check_decodable(choice: str) -> None:
  """Raises for an MoE layer with `choice="expert"` (its `MoEConfig.choice`). Each expert ranks a
  whole group of tokens, and a decoding step's group is the B / shards new tokens of the batch, so
  the layer would compute another function (C slots per expert out of those few tokens, not out
  of the training group) than the one it was trained as."""
  if choice == "expert":
    raise ValueError(
        "config.model.moe.choice='expert': expert-choice routing ranks a whole group of tokens, "
        "which autoregressive decoding does not have, so cached generation is not defined for "
        "it; allowed: choice='token' (evaluate expert-choice runs teacher-forced, with "
        "experiments/evaluate.py).")


def generate(model: nnx.Module, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, capacity_factor: float | None = math.inf,
             max_len: int | None = None, return_logits: bool = False,
             record_routes: bool = False) -> Generation:
  """Samples `max_new_tokens` after each token-id prompt (see the module docstring).

  Runs under the caller's mesh (`jax.set_mesh`), or on one device without one, and leaves the
  model in eval mode. `max_len`, when given (the run's `seq_len`), bounds prompt + new tokens: the
  model never saw longer rows.
  """
  check_sampling(temperature, top_k, top_p, max_new_tokens)
  check_lengths(prompts, max_new_tokens, max_len)
  for layer in model.moe_layers():
    check_decodable(layer.cfg.choice)
  shards = sharding.num_batch_shards(jax.sharding.get_abstract_mesh())
  rows = -(-len(prompts) // shards) * shards
  batch = pad_prompts(prompts, rows)

  graphdef, state = nnx.split(model)
  tokens_BT, logits_BTV, recorded = jax.device_get(_generate_jit(
      state, batch["tokens"], batch["segment_ids"], batch["positions"], key, graphdef=graphdef,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=eos_id, return_logits=return_logits, record_routes=record_routes,
      capacity_factor=capacity_factor))
  out = []
  for row in tokens_BT[:len(prompts)]:
    if eos_id is not None and (row == eos_id).any():
      row = row[:int(np.argmax(row == eos_id))]
    out.append(np.asarray(row))
  n = len(prompts)
  routes = columns = gates = None
  if record_routes:
    routes = {i: np.asarray(r[:n]) for i, r in recorded["routes"].items()}
    gates = {i: np.asarray(g[:n]) for i, g in recorded["gates"].items()}
    columns = {k: np.asarray(v[:n]) for k, v in recorded["columns"].items()}
  return Generation(out, None if logits_BTV is None else np.asarray(logits_BTV[:n]), routes,
                    columns, gates)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "return_logits", "record_routes",
                                             "capacity_factor"))
def _generate_jit(state, tokens_BP, segment_ids_BP, positions_BP, key, *, graphdef,
                  max_new_tokens, temperature, top_k, top_p, eos_id, return_logits,
                  record_routes, capacity_factor):
  """Prefill, then a scan of one-token steps; one compilation per (model, shapes, settings)."""
  model = nnx.merge(graphdef, state)
  if not jax.sharding.get_abstract_mesh().empty:  # Rows over the batch shards, like training.
    tokens_BP, segment_ids_BP, positions_BP = (
        jax.lax.with_sharding_constraint(x, sharding.batch_spec())
        for x in (tokens_BP, segment_ids_BP, positions_BP))
  sample = lambda k, logits_BV: sample_logits(k, logits_BV, temperature=temperature, top_k=top_k,
                                              top_p=top_p)
  B, P = tokens_BP.shape
  cache = model.init_cache(B, P + max_new_tokens)
  logits_BPV, cache, prompt_routes, prompt_gates = model.decode(
      tokens_BP, positions_BP, segment_ids_BP, cache, return_routes=True,
      moe_capacity_factor=capacity_factor)
  logits_BV = logits_BPV[:, -1]
  token_B = sample(jax.random.fold_in(key, 0), logits_BV)
  done_B = jnp.zeros((B,), bool) if eos_id is None else token_B == eos_id

  def step(carry, n):
    cache, token_B, position_B, done_B = carry
    segment_B = jnp.where(done_B, 0, 1).astype(jnp.int32)  # A finished row takes no capacity.
    logits_B1V, cache, routes, gates = model.decode(token_B[:, None], position_B[:, None],
                                                    segment_B[:, None], cache, return_routes=True,
                                                    moe_capacity_factor=capacity_factor)
    next_B = sample(jax.random.fold_in(key, n), logits_B1V[:, 0])
    if eos_id is not None:
      done_B = done_B | (next_B == eos_id)
    recorded = (({"routes": routes, "gates": gates},
                 {"tokens": token_B, "positions": position_B, "segment_ids": segment_B})
                if record_routes else ({}, {}))
    return (cache, next_B, position_B + 1, done_B), (next_B, logits_B1V[:, 0], *recorded)

  carry = (cache, token_B, positions_BP[:, -1] + 1, done_B)
  _, (tokens_TB, logits_TBV, routes_T, fed_T) = jax.lax.scan(step, carry,
                                                             jnp.arange(1, max_new_tokens))
  tokens_BT = jnp.concatenate([token_B[:, None], tokens_TB.T], axis=1)
  recorded = None
  if record_routes:  # [B, P + T - 1] columns: the prompt, then every token fed back
    at_prompt = {"routes": prompt_routes, "gates": prompt_gates}
    recorded = {
        **{kind: {i: jnp.concatenate([at_prompt[kind][i], r.transpose(1, 0, 2, 3)[:, :, 0]], 1)
                  for i, r in routes_T[kind].items()} for kind in ("routes", "gates")},
        "columns": {k: jnp.concatenate([prompt, fed_T[k].T], axis=1) for k, prompt in
                    (("tokens", tokens_BP), ("positions", positions_BP),
                     ("segment_ids", segment_ids_BP))}}
  if not return_logits:
    return tokens_BT, None, recorded
  return (tokens_BT, jnp.concatenate([logits_BV[:, None], logits_TBV.transpose(1, 0, 2)], axis=1),
          recorded)
