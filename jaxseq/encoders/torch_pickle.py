"""Read PyTorch ``.pth`` state dicts into numpy arrays without torch and without running code from the file.

A ``.pth`` file is a pickle, and unpickling an untrusted pickle can run any code. This reader uses a
restricted unpickler that resolves only the few globals a plain state dict needs (``OrderedDict``, the
storage types, ``torch._utils._rebuild_tensor_v2``) to our own harmless stand-ins; any other global (for
example ``os.system``, or a pickled ``nn.Module``) raises ``pickle.UnpicklingError`` before anything runs.

Both container formats are read:

- the legacy format (torch < 1.6, e.g. ``efficientnet-lite0-57934424.pth``): five pickles in a row (magic
  number, protocol version, system info, the state dict, the storage keys) followed by each storage's raw
  bytes, each preceded by its element count as a little-endian int64;
- the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one raw file per storage, ``<archive>/data/<key>``.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

class WeightsFileError(pickle.UnpicklingError, ValueError):
    """A weights file that cannot be read safely: refused globals, or bytes that are not a torch pickle. An
    ``UnpicklingError`` for callers of the pickle API, a ValueError for bad input (the command line reports it
    in one line)."""


LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage classes (as they are named in the pickle) -> numpy dtype of one element.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage named in the pickle; its bytes are filled in after unpickling (legacy) or read lazily (zip)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _LazyTensor:
    """What ``_rebuild_tensor_v2`` returns here: a view description, materialised once the bytes are known."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key!r} was referenced but never stored in the file")
        if not self.size:
            return np.array(data[self.offset], copy=True)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if min(self.size) > 0 and (self.offset < 0 or last >= data.size or min(self.stride) < 0):
            raise pickle.UnpicklingError(
                f"tensor view (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"runs outside its storage {self.storage.key!r} of {data.size} elements")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride], writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Signature of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    # backward_hooks, metadata=None); gradients and hooks mean nothing for inference weights.
    del unused
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict; storages come through ``persistent_load``."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensor data is accepted from a weights file "
            "(a state dict of tensors); this file asks for code")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {saved_id!r}: only storages are accepted")
        # Legacy: ('storage', type, key, location, numel, view_metadata); zip: ('storage', type, key, location, numel).
        storage_type, key, _location, numel = saved_id[1:5]
        view_metadata = saved_id[5] if len(saved_id) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key!r} has type {storage_type!r}, expected a torch storage type")
        if view_metadata is not None:
            raise pickle.UnpicklingError(f"storage {key!r} is a legacy storage view; this reader does not support them")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(str(key), storage_type.dtype, int(numel))
        return storage


def _materialise_tree(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return {k: _materialise_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise_tree(v) for v in obj)
    return obj


def _flatten_state_dict(tree, path: str, out: dict) -> None:
    if isinstance(tree, np.ndarray):
        out[path] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flatten_state_dict(v, f"{path}.{k}" if path else str(k), out)
    else:
        raise ValueError(f"weights entry {path!r} is a {type(tree).__name__}, expected a tensor")


def _read_legacy(f, path: str, storages: dict[str, _Storage]):
    # The three header pickles hold only ints and a dict of ints, so the restricted unpickler reads them too.
    magic = _RestrictedUnpickler(f, storages).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path}: not a PyTorch weights file (magic number {magic!r})")
    protocol = _RestrictedUnpickler(f, storages).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported legacy torch protocol {protocol!r}, expected {LEGACY_PROTOCOL_VERSION}")
    sys_info = _RestrictedUnpickler(f, storages).load()
    if not isinstance(sys_info, dict):
        raise ValueError(f"{path}: not a PyTorch weights file (system info is a {type(sys_info).__name__})")
    if not sys_info.get("little_endian", True):
        raise ValueError(f"{path}: big-endian torch files are not supported")
    tree = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, storages).load()
    if not isinstance(keys, (list, tuple)):
        raise ValueError(f"{path}: not a PyTorch weights file (storage keys are a {type(keys).__name__})")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise ValueError(f"{path}: raw data for storage {key!r}, which no tensor refers to")
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != storage.numel:
            raise ValueError(f"{path}: storage {key!r} holds {numel} elements, the pickle said {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated file: storage {key!r} needs {nbytes} bytes, {len(raw)} left")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return tree


def _read_zip(path: str, storages: dict[str, _Storage]):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a torch zip archive has exactly one data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        tree = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) != storage.numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: storage {key!r} has {len(raw)} bytes, "
                                 f"expected {storage.numel} x {storage.dtype.itemsize}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return tree


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (legacy or zip ``.pth``) as ``{"layer.weight": np.ndarray}``, torch-free.

    Nested dicts are flattened with dots. Only tensor data is accepted: a file that pickles anything else
    (modules, functions, arbitrary objects) raises ``pickle.UnpicklingError`` without running any of it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch weights file, or inconsistent/truncated data.
        WeightsFileError: (an ``UnpicklingError`` and a ``ValueError``) the pickle asks for a global other than
          tensor/storage/OrderedDict, or its bytes are not a pickle at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    storages: dict[str, _Storage] = {}
    try:
        if zipfile.is_zipfile(path):
            tree = _read_zip(path, storages)
        else:
            with open(path, "rb") as f:
                tree = _read_legacy(f, path, storages)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, KeyError, UnicodeDecodeError,
            OverflowError, MemoryError) as error:
        # What arbitrary bytes make the unpickler raise (a length field read from garbage can ask for exabytes);
        # a refused global says so in its own message.
        raise WeightsFileError(f"{path}: not a readable PyTorch weights file ({type(error).__name__}: "
                               f"{error})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: holds a {type(tree).__name__}, expected a state dict (a dict of tensors)")
    flat: dict[str, np.ndarray] = {}
    _flatten_state_dict(_materialise_tree(tree), "", flat)
    return flat
