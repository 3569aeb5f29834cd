"""moejax: Mixture-of-Experts transformers in JAX / Flax NNX.

`import moejax` loads the layers only; it never imports TensorFlow (the data pipeline,
`moejax.data`, is the one module allowed to).

Tensor names carry their shape, one letter per axis, with one vocabulary for the whole package:

  B batch             L sequence (query positions)   M key positions     D model width
  F FFN / expert width V vocabulary                  H query heads       N key/value heads
  R = H / N query heads per kv head                  d head dim          1 a size-1 axis
  E experts           K experts per token (top-k)    G routing groups    S tokens per group
  C capacity (slots per expert per group)            X rows of an expert's buffer (G * C)
  Y slots of a group's buffer (E * C)                U tokens, flattened (G * S, or a batch's)
  A (token, choice) pairs, flattened (U * K or S * K): the rows of the dropless sort
  Q expert groups (group-limited routing)
  J devices of the `expert` mesh axis                W rows one device sends another (dropless)
  Z blocks of the blocked grouped matmul             b rows per block
  P prompt length (left-padded)                      T new tokens of a decoding call

A device's shard of an axis keeps the axis's letter (under expert parallelism E counts its local
experts). Generic helpers (`dispatch.take_rows`, `grouped.permute_rows`, ...) name their arrays
without a suffix and give the shapes in their docstrings.
"""
