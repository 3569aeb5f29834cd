"""A two-entry sweep over the tiny config, for tests/test_sweep.py."""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.num_train_steps, c.eval_every, c.log_every, c.checkpoint_every = 4, 4, 2, 4
  return c


def sweep():
  return [{"model.moe.capacity_factor": cf} for cf in (0.5, 2.0)]
