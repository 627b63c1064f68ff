"""Deprecated name of :mod:`cmhash.training.methods`, kept for one release.

``import cmhash.training.models.hfah`` still works and gives the very module
``cmhash.training.methods.hfah`` (not a copy: one class per method in the registry).
"""

import importlib
import pkgutil
import sys
import warnings

from . import methods

warnings.warn("cmhash.training.models is now cmhash.training.methods; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)

for _module in pkgutil.iter_modules(methods.__path__):
    globals()[_module.name] = sys.modules[f"{__name__}.{_module.name}"] = importlib.import_module(
        f"{methods.__name__}.{_module.name}")
