"""The step contract: model artifacts, steps, the registry, profiles, the job spec."""
