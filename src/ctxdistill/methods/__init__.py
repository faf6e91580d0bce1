"""Methods: each is a config file under conf/method/ plus one module here.

A module holds its method's schema (a :class:`~ctxdistill.config.MethodConfig` subclass with its
defaults, allowed values and checks, registered in the config store from here) and its
:class:`Method`: what it trains on, how its batches are built, what its loss is. The shared
trainer (ctxdistill.trainer) owns the loop and never asks which method it runs.
"""

from __future__ import annotations

import importlib
import pkgutil

from ctxdistill.methods.base import Method, build_method

__all__ = ["Method", "build_method", "method_schemas"]


def method_schemas() -> list[type]:
    """Every method schema that names itself for the config store, from every module of this package."""
    from ctxdistill.config import MethodConfig

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = [], list(MethodConfig.__subclasses__())
    while todo:
        schema = todo.pop()
        todo.extend(schema.__subclasses__())
        if schema.schema_name:
            found.append(schema)
    return sorted(found, key=lambda schema: schema.schema_name)
