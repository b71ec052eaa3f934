"""Read PyTorch's legacy (pre-zip, protocol 1001) ``.pth`` files without torch.

``torch.save`` before PyTorch 1.6 wrote a flat stream of pickles::

    magic number | protocol version (1001) | system-info dict
    | object pickle (here: the state dict) | list of storage keys
    | for each key, in that order: int64 element count + raw little-endian data

Inside the object pickle every tensor is a call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose
storage is a persistent id ``('storage', <torch.XxxStorage>, key, location,
numel, view_metadata)``; the storage bytes only follow after the pickle.

Security: a pickle can call any importable callable, so a generic
``pickle.load`` on a downloaded file is arbitrary code execution. The
unpickler below resolves only an explicit allowlist of names to inert
placeholders and refuses everything else with :class:`PretrainedWeightsError`.
Tensor views are bounds-checked against their storage before they are built,
and a tensor may not have more elements than its storage (state dicts hold no
expanded views), so a hostile file cannot make us read or allocate wildly.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
from dataclasses import dataclass
from os import PathLike
from typing import IO, Any, ClassVar

import numpy as np

from medcls.core.errors import PretrainedWeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# Storage classes that map onto a numpy dtype (all stored little-endian).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2",
        "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2",
        "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    }.items()
}


@dataclass
class _Storage:
    """A storage announced by the pickle; ``data`` is filled in afterwards."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as described by the pickle: a strided view of a storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        assert self.storage.data is not None
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset:],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        # Real checkpoints do contain non-contiguous tensors (converted TF kernels).
        return view.astype(self.storage.dtype.newbyteorder("="), order="C")


def _rebuild_tensor_v2(storage, offset, size, stride, *_ignored) -> _TensorRef:
    """Placeholder for ``torch._utils._rebuild_tensor_v2``: validate, defer."""
    if not isinstance(storage, _Storage):
        raise PretrainedWeightsError("tensor does not reference a storage")
    size, stride = tuple(size), tuple(stride)
    if not (isinstance(offset, int) and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))):
        raise PretrainedWeightsError(f"bad tensor geometry {offset=} {size=} {stride=}")
    if math.prod(size) > storage.numel:  # expanded views; also caps memory use
        raise PretrainedWeightsError(f"tensor of size {size} exceeds its storage")
    if 0 not in size:  # an empty tensor touches no element at all
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise PretrainedWeightsError(
                f"tensor reaches element {last} of storage {storage.key!r} "
                f"which has only {storage.numel}")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _TensorRef:
    """Placeholder for ``torch._utils._rebuild_parameter``: a Parameter is its data."""
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that knows only the handful of names a state dict needs."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    }

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise PretrainedWeightsError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise PretrainedWeightsError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise PretrainedWeightsError(f"unsupported storage type {storage_type!r}")
        if view_metadata is not None:
            raise PretrainedWeightsError("storage views are not supported")
        if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise PretrainedWeightsError(f"bad storage record {pid!r}")
        storage = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise PretrainedWeightsError(f"storage {key!r} declared inconsistently")
        return storage


def _load_pickle(file: IO[bytes], storages: dict[str, _Storage]) -> Any:
    """Load the next pickle of the stream, mapping every failure to our error."""
    try:
        return _RestrictedUnpickler(file, storages).load()
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, bad opcodes, ...
        raise PretrainedWeightsError(f"corrupt pickle stream: {exc!r}") from exc


def _read_exact(file: IO[bytes], n: int, what: str) -> bytes:
    # Check before reading: a forged element count must not make us allocate it.
    if file.tell() + n > os.fstat(file.fileno()).st_size:
        raise PretrainedWeightsError(f"file truncated while reading {what}")
    return file.read(n)


def _read_storage_data(file: IO[bytes], keys: Any, storages: dict[str, _Storage]) -> None:
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and sorted(keys) == sorted(storages)):
        raise PretrainedWeightsError("storage key list does not match the tensors")
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q", _read_exact(file, 8, f"size of storage {key!r}"))
        if numel != storage.numel:
            raise PretrainedWeightsError(
                f"storage {key!r} holds {numel} elements, pickle said {storage.numel}")
        raw = _read_exact(file, numel * storage.dtype.itemsize, f"storage {key!r}")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)


def read_state_dict(path: str | PathLike[str]) -> dict[str, np.ndarray]:
    """Return the state dict of a legacy ``.pth`` file as native numpy arrays.

    Raises :class:`PretrainedWeightsError` for anything other than a complete,
    little-endian legacy checkpoint whose top-level object is a flat mapping
    of names to tensors, and for any pickle referencing a non-allowlisted name.
    """
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as file:
        if _load_pickle(file, storages) != MAGIC_NUMBER:
            raise PretrainedWeightsError("not a legacy PyTorch checkpoint (bad magic number)")
        if _load_pickle(file, storages) != PROTOCOL_VERSION:
            raise PretrainedWeightsError("unsupported legacy protocol version")
        sys_info = _load_pickle(file, storages)
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise PretrainedWeightsError("only little-endian checkpoints are supported")
        state = _load_pickle(file, storages)
        _read_storage_data(file, _load_pickle(file, storages), storages)

    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()):
        raise PretrainedWeightsError("top-level object is not a flat name -> tensor mapping")
    return {name: ref.materialise() for name, ref in state.items()}
