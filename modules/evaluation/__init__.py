"""Evaluation: measurement, statistics, hardware simulation, sweeps and plots."""
