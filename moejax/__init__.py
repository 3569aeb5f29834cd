"""moejax: Mixture-of-Experts transformers in JAX / Flax NNX.

`import moejax` loads the layers only; it never imports TensorFlow (the data pipeline,
`moejax.data`, is the one module allowed to).
"""
