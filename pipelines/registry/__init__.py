"""Figures to a registered model: the pyfunc model (``pyfunc_model.py``), logging, registration and promotion
(``registry.py``), loading and prediction (``predict.py``)."""
