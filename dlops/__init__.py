"""dlops: Optuna hyperparameter studies for deep-learning experiments."""

__version__ = "0.1.0"
