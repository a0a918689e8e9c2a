"""Core: config, registries, errors, checkpoints, device/AMP, MLflow tracking. Imports no other dfsweep package."""
