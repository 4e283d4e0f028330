"""The shared training loop and the `train` step that makes baselines."""
