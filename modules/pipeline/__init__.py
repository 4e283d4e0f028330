"""The step pipeline: registry, job spec, profiles, run_step and the in-process runner."""
