"""Figures to a registered model: the pyfunc model, registration and promotion, prediction."""
