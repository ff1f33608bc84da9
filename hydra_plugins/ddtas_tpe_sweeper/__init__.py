"""Hydra sweeper plugin: Optuna TPE search over the project's train function (see tpe_sweeper.py)."""
