"""Meta-steps that drive techniques: sensitivity scans, sweeps, the auto search."""
