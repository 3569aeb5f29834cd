"""Experiment configs (ml_collections); `common` holds the shared defaults and `parse_arg`."""
