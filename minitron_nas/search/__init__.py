"""The architecture search: candidates, samplers, successive halving, the Optuna study and the runner."""
