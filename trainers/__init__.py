"""Trainers registered in ``core.engine.TRAINER_REGISTRY``, found without a list to edit.

A trainer is one module ``trainers/<name>.py`` that defines ``extend_cfg(cfg)`` (its config node,
``TRAINER.<NODE>``) and a class decorated with ``@TRAINER_REGISTRY.register()``. Everything the
sweeps, the recipe chooser (trainers/recipes.py), the aggregator and the checkpoint readers need to
know about it is declared on that class (``KIND``, ``LABEL``, ``RECIPES``, ... : see
``trainers/base.py``, class ``CLIPTrainer``) and read through :func:`trainer_class`.

- :func:`trainer_modules` finds the trainer modules by parsing ``trainers/*.py`` (Python ``ast``,
  nothing imported), so ``python train.py --list`` answers without importing torch.
- :func:`register_all` imports them (registering every trainer); :func:`extend_cfg` also adds each
  trainer's config node, so that any recipe's keys are known.
"""
import ast
import functools
import importlib
import os

TRAINERS_DIR = os.path.dirname(os.path.abspath(__file__))


def _registered_names(tree):
    """Names registered by ``@TRAINER_REGISTRY.register()`` / ``register(name="x")`` in a parsed module."""
    names = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            func = call.func if call else deco
            if (isinstance(func, ast.Attribute) and func.attr == "register"
                    and isinstance(func.value, ast.Name) and func.value.id == "TRAINER_REGISTRY"):
                name = node.name
                for kw in call.keywords if call else ():
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        name = kw.value.value
                names.append(name)
    return names


@functools.lru_cache(maxsize=1)
def trainer_modules():
    """{registered trainer name: module name} of every ``trainers/<module>.py`` that registers one."""
    found = {}
    for file in sorted(os.listdir(TRAINERS_DIR)):
        if not file.endswith(".py") or file.startswith("_"):
            continue
        with open(os.path.join(TRAINERS_DIR, file), encoding="utf-8") as f:
            source = f.read()
        if "TRAINER_REGISTRY" not in source:
            continue
        for name in _registered_names(ast.parse(source, filename=file)):
            found[name] = file[:-3]
    return found


def trainer_names():
    """Registered trainer names, sorted case-insensitively (no import of any trainer)."""
    return tuple(sorted(trainer_modules(), key=str.lower))


def __getattr__(name):
    # TRAINER_NAMES stays readable as a module attribute; it is computed, not a list to edit.
    if name == "TRAINER_NAMES":
        return trainer_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_all():
    """Import every trainer module (registering its trainer); returns the modules."""
    modules = dict.fromkeys(trainer_modules().values())
    return [importlib.import_module(f".{module}", __name__) for module in modules]


def extend_cfg(cfg):
    for module in register_all():
        module.extend_cfg(cfg)


def trainer_class(name):
    """The registered class of trainer ``name`` (every trainer module imported); UserError if unknown."""
    register_all()
    from core.engine import TRAINER_REGISTRY

    return TRAINER_REGISTRY.get(name)
