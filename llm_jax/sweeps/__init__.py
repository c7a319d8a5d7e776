"""Hyper-parameter sweeps on Optuna: the search space, the study, its workers and report."""
