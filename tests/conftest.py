"""Test set-up: 8 fake CPU devices, so multi-device tests run on any machine.

XLA reads the flag when JAX initialises its backends, which happens lazily on first use, so
setting it here (before any test imports and uses jax) is early enough.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TensorFlow (imported only by data tests) off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
