"""A name -> object registry, as in Dassl, with registration by explicit name."""
from .errors import UserError


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._objects = {}

    def register(self, obj=None, name=None):
        """Decorator (``@REG.register()`` or ``@REG.register(name="x")``) or direct call."""

        def _do(o):
            key = name or o.__name__
            if key in self._objects and self._objects[key] is not o:
                raise KeyError(f"{self.kind} '{key}' is already registered")
            self._objects[key] = o
            return o

        if obj is None:
            return _do
        return _do(obj)

    def get(self, name):
        if name not in self._objects:
            raise UserError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(self.registered_names())}"
            )
        return self._objects[name]

    def registered_names(self):
        return sorted(self._objects, key=str.lower)

    def __contains__(self, name):
        return name in self._objects

    def __len__(self):
        return len(self._objects)
