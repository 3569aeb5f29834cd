"""moejax: Mixture-of-Experts transformers in JAX / Flax NNX.

`import moejax` loads the layers only; it never imports TensorFlow (the data pipeline,
`moejax.data`, is the one module allowed to).

Tensor names carry their shape, one letter per axis, with one vocabulary for the whole package:

  B batch             L sequence (query positions)   M key positions     D model width
  F FFN / expert width V vocabulary                  H query heads       N key/value heads
  R = H / N query heads per kv head                  d head dim
  E experts           K experts per token (top-k)    G routing groups    S tokens per group
  C capacity (slots per expert per group)            X rows of an expert's buffer (G * C)
  P prompt length (left-padded)                      T new tokens of a decoding call
"""
