"""ctxdistill: a Hydra-configured reproduction suite for context distillation."""

__version__ = "0.1.0"
