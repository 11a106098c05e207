"""Trainers are found by name in a registry, never imported from a dotted path in a file.

Every subclass of ``Trainer`` registers itself under its class name when its module is
imported (``__init_subclass__``), so a user's trainer only has to subclass and be imported:
``kitspipe train WORK --plugin my_trainers.py --trainer MyTrainer``. The plugin path comes
from the command line (the user's own choice), not from a plans file or checkpoint, so a
downloaded file cannot make kitspipe import code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from kitspipe.errors import KitspipeError

TRAINERS: dict[str, type] = {}


def register(cls: type) -> type:
    name = cls.__name__
    existing = TRAINERS.get(name)
    if existing is not None and existing is not cls and existing.__module__ != cls.__module__:
        raise KitspipeError(f"train: trainer name {name!r} is defined twice "
                            f"({existing.__module__} and {cls.__module__})")
    TRAINERS[name] = cls
    return cls


def get_trainer(name: str) -> type:
    import kitspipe.trainers.builtin  # noqa: F401  registers the shipped trainers

    if name not in TRAINERS:
        raise KitspipeError(f"train: unknown trainer {name!r} (known: {', '.join(sorted(TRAINERS))}; "
                            "load your own with --plugin FILE_OR_MODULE)")
    return TRAINERS[name]


def load_plugin(spec: str) -> None:
    """Import a user module (a .py path or an importable module name) so its trainers register."""
    path = Path(spec)
    if path.suffix == ".py":
        if not path.is_file():
            raise KitspipeError(f"train: plugin file {spec} does not exist")
        module_name = f"kitspipe_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ImportError as error:
            raise KitspipeError(f"train: cannot import plugin module {spec!r} ({error})") from None
