"""The state dict of a TorchScript archive, read as data: none of the archive's code runs.

``torch.jit.save`` writes a zip holding ``<name>/data.pkl`` (the module tree, pickled),
``<name>/data/<key>`` (the raw bytes of each tensor storage) and ``<name>/code/`` (the
module classes as TorchScript source). ``torch.jit.load`` compiles and runs that code
(``__setstate__`` included), so a crafted archive can do anything on load. Here
``data.pkl`` is unpickled with a closed list of globals: tensor rebuilders, storage
types, ``OrderedDict`` and TorchScript's list builders. Module objects become inert
records of their attributes, and every other global is refused. Which attributes are
parameters and buffers is read from the ``__parameters__`` / ``__buffers__`` lists of
each class, parsed (``ast``, never executed) from the code files, so the result has
exactly the entries ``torch.jit.load(path).state_dict()`` would have.
"""
from __future__ import annotations

import ast
import io
import pickle
import zipfile
from collections import OrderedDict

import torch

# Storage classes named in data.pkl -> element type.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class Unreadable(Exception):
    """The archive holds something this reader does not rebuild; the message says what (one line)."""


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _ScriptObject:
    """A TorchScript object (module or class instance) as pickled: its class name and attribute dict."""

    qualified_name = ""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state


def _tensor_from(storage, storage_offset, size, stride):
    if not (torch.is_tensor(storage) and isinstance(storage_offset, int)
            and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride))
            and len(size) == len(stride)):
        raise Unreadable("a tensor record is malformed")
    try:
        return storage.as_strided(tuple(size), tuple(stride), storage_offset)
    except RuntimeError:
        raise Unreadable("a tensor reaches beyond its storage") from None


def _no_hooks(hooks):
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise Unreadable("a tensor carries backward hooks")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    _no_hooks(backward_hooks)
    return _tensor_from(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _no_hooks(backward_hooks)
    if not isinstance(dtype, torch.dtype) or storage.dtype != dtype:
        raise Unreadable("a tensor's element type differs from its storage's")
    return _tensor_from(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    _no_hooks(backward_hooks)
    if not torch.is_tensor(data):
        raise Unreadable("a parameter record holds no tensor")
    return data


def _as_list(values):
    return list(values)


def _restore_type_tag(value, type_str):
    return value


def _ordered_dict(*args):
    if args and (len(args) > 1 or not isinstance(args[0], (list, tuple))):
        raise Unreadable("an OrderedDict record is malformed")
    return OrderedDict(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _Unpickler(pickle.Unpickler):
    """data.pkl with tensors rebuilt from the archive's storages and modules kept as inert records."""

    def __init__(self, data, archive, prefix):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._storages, self._classes = archive, prefix, {}, {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.split(".")[0] == "__torch__" and not module.startswith("__torch__.torch.classes"):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:  # an inert record: the class's own code is never looked at here
                self._classes[qualified] = type("ScriptObject", (_ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        raise Unreadable(f"its pickled state names {module}.{name}, which is not part of a module's weights")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and pid[2].isdigit() and isinstance(pid[4], int) and pid[4] >= 0):
            raise Unreadable(f"its pickled state refers to {str(pid)[:60]}, which is not a tensor storage")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise Unreadable(f"storage data/{key} is missing; the file is incomplete") from None
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            if len(raw) < numel * itemsize:
                raise Unreadable(f"storage data/{key} is shorter than its tensor; the file is incomplete")
            flat = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=kind.dtype) if numel else \
                torch.empty(0, dtype=kind.dtype)
            self._storages[key] = flat
        flat = self._storages[key]
        if flat.dtype != kind.dtype or flat.numel() != numel:
            raise Unreadable(f"storage data/{key} is read with two element types or sizes")
        return flat


def _class_fields(archive, prefix, qualified, cache):
    """(is a module, parameter names, buffer names) of TorchScript class ``qualified``, from its source text."""
    if qualified in cache:
        return cache[qualified]
    module, _, name = qualified.rpartition(".")
    path = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        tree = ast.parse(archive.read(path).decode("utf-8"))
    except KeyError:
        raise Unreadable(f"the code of class {qualified} is missing") from None
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        raise Unreadable(f"the declaration of class {qualified} cannot be read") from None
    found = None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            is_module = any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases)
            lists = {}
            for item in node.body:
                if (isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name)
                        and item.targets[0].id in ("__parameters__", "__buffers__")):
                    try:
                        value = ast.literal_eval(item.value)
                    except ValueError:
                        value = None
                    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                        raise Unreadable(f"class {qualified} declares its {item.targets[0].id} in an unknown form")
                    lists[item.targets[0].id] = value
            if is_module and len(lists) != 2:
                raise Unreadable(f"module class {qualified} does not declare its parameters and buffers")
            found = (is_module, lists.get("__parameters__", []), lists.get("__buffers__", []))
            break
    if found is None:
        raise Unreadable(f"class {qualified} is not declared in {path}")
    cache[qualified] = found
    return found


def _collect(obj, archive, prefix, cache, out, name_prefix, seen):
    if id(obj) in seen:
        raise Unreadable("its module tree contains a cycle")
    seen.add(id(obj))
    state = obj.state
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise Unreadable(f"module {obj.qualified_name} is pickled with a custom state, not its attributes")
    _, parameters, buffers = _class_fields(archive, prefix, obj.qualified_name, cache)
    for key in (*parameters, *buffers):
        value = state.get(key)
        if value is None:  # an optional parameter or buffer that is not set (Linear without bias)
            continue
        if not torch.is_tensor(value):
            raise Unreadable(f"{name_prefix}{key} is declared a parameter or buffer but holds no tensor")
        out[name_prefix + key] = value
    for key, value in state.items():
        if isinstance(value, _ScriptObject) and _class_fields(archive, prefix, value.qualified_name, cache)[0]:
            _collect(value, archive, prefix, cache, out, f"{name_prefix}{key}.", seen)


def read_torchscript_state_dict(path):
    """Parameters and buffers of a TorchScript archive, ``{dotted name: tensor}`` as its module's state_dict().

    Raises :class:`Unreadable` when the archive holds anything but modules, tensors and plain values.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise Unreadable("it has no data.pkl at its top level (an old or unknown TorchScript format)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        except KeyError:
            byteorder = "little"
        if byteorder != "little":
            raise Unreadable(f"its tensors are stored {byteorder}-endian")
        try:
            root = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
        except Unreadable:
            raise
        except Exception as e:  # truncated or malformed pickle
            raise Unreadable(f"its pickled state cannot be read ({type(e).__name__})") from None
        if not isinstance(root, _ScriptObject):
            raise Unreadable("its pickled state is not a module")
        state_dict = OrderedDict()
        try:
            _collect(root, archive, prefix, {}, state_dict, "", set())
        except RecursionError:
            raise Unreadable("its modules are nested deeper than any model's") from None
    return state_dict
