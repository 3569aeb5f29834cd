"""Sample from a trained run with a KV cache.

    python experiments/sample.py --workdir=RUN --prompt="The kernel" --prompt="def main(" \
        --max_new_tokens=200 [--temperature=0.8 --top_k=0 --top_p=0.95 --seed=0] \
        [--prompt_file=prompts.txt] [--step=N] [--mesh=data=-1,expert=1] [--eval_capacity]

Restores the run's checkpoint (latest, or `--step`) with the config it wrote, encodes each prompt
with the run's tokenizer ([BOS] + text, as training saw a document start), generates all prompts as
one batch (`moejax.generate`) and prints each continuation. `--temperature=0` is greedy. Decoding
never drops a token (unlimited MoE capacity) unless `--eval_capacity`, which routes each step's
batch of new tokens as one group at the run's eval capacity factor. Runs on the run's mesh or any
other (`--mesh`, e.g. `data=1` on one CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from moejax import cli  # noqa: E402  pylint: disable=wrong-import-position
from moejax import data as data_lib  # noqa: E402  pylint: disable=wrong-import-position
from moejax import generate, sharding, train  # noqa: E402  pylint: disable=wrong-import-position


def main(argv: list[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--prompt", action="append", default=[],
                      help="a prompt (repeat for a batch)")
  parser.add_argument("--prompt_file", help="one prompt per line (blank lines skipped)")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help="default: 128, or fewer if the run's seq_len allows fewer")
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="0 = greedy; higher = more random")
  parser.add_argument("--top_k", type=int, default=0,
                      help="sample among the k most likely tokens (0 = all)")
  parser.add_argument("--top_p", type=float, default=1.0,
                      help="nucleus sampling: the smallest set with this much probability")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: latest)")
  parser.add_argument("--mesh", default=None, help="e.g. data=-1,expert=1 (default: the run's)")
  parser.add_argument("--eval_capacity", action="store_true",
                      help="route at the run's eval capacity factor instead of no drop")
  args = parser.parse_args(argv)
  prompts = list(args.prompt)
  if args.prompt_file:
    with open(args.prompt_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  config = train.load_run_config(args.workdir)
  tokenizer = data_lib.get_tokenizer(config.data)
  prompt_ids = generate.encode_prompts(tokenizer, prompts)  # Bad input fails before loading.
  if args.max_new_tokens is None:
    args.max_new_tokens = max(1, min(128, config.seq_len - max(len(p) for p in prompt_ids)))
  generate.check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
  generate.check_lengths(prompt_ids, args.max_new_tokens, config.seq_len)
  model_cfg = train.validate_config(config)  # As load_model does, before it builds anything.
  if model_cfg.moe_layer_indices:
    generate.check_decodable(model_cfg.moe_config().choice)
  mesh_shape = sharding.parse_mesh(args.mesh) if args.mesh else None
  model, mesh, step = train.load_model(config, args.workdir, args.step, mesh_shape=mesh_shape)
  # One compiled call (prefill, then a scan of one-token steps): no per-token progress to show,
  # so say what is happening and how long it took.
  print(f"sample: step {step} restored; compiling and generating {args.max_new_tokens} tokens "
        f"for {len(prompt_ids)} prompt(s)", file=sys.stderr, flush=True)
  start = time.time()
  with jax.set_mesh(mesh):
    out = generate.generate(model, prompt_ids, max_new_tokens=args.max_new_tokens,
                            key=jax.random.key(args.seed), temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id,
                            capacity_factor=None if args.eval_capacity else math.inf,
                            max_len=config.seq_len)
  texts = [tokenizer.decode(tokens) for tokens in out.tokens]
  print(f"sample: done in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
  print(f"# {args.workdir} step {step}, temperature {args.temperature:g}, top_k {args.top_k}, "
        f"top_p {args.top_p:g}, seed {args.seed}")
  for prompt, text in zip(prompts, texts):
    print(f"--- {prompt!r}\n{prompt}{text}")
  return texts


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
