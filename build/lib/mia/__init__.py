"""mia: membership inference attacks on image classifiers, in the layout of the Trustworthy ML Challenge 2022.

Modules, one idea each: bundle (find victims), data (safe record loading), checkpoints (weights and
architectures), scoring (batched inference under query views), signals (float64 per-record signals),
thresholds (exact sweeps), attacks (candidates and cross-validated selection), metrics, plots,
submission (results/*.npy and result.json), pipeline (the workflow), demo (the Fashion-MNIST demo
bundle), report (tables), cli (``python -m mia``).
"""
__version__ = "0.1.0"
