"""Methods: each is a config file under conf/method/ plus one module here.

A method says what it trains on, how its batches are built and what its loss is;
the shared trainer (ctxdistill.trainer) owns the loop and never asks which method it runs.
"""

from ctxdistill.methods.base import Method

__all__ = ["Method"]
