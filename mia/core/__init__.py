"""Foundations: signals, thresholds, metrics, logistic regression. They import nothing of the package above them."""
