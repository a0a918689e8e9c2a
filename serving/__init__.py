"""Serving: ensembles, the registry and promotion, the pyfunc model, batch prediction."""
