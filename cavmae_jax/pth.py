"""Read PyTorch ``.pth`` checkpoints into NumPy without PyTorch and without running pickled code.

A ``torch.save`` file is a zip holding ``data.pkl`` and one raw file per storage. The pickle is
read with an unpickler that resolves only the names a state_dict needs (dicts, tensor rebuilds,
storage types); any other global, such as ``os.system``, is refused before it can run.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from cavmae_jax.paths import Path

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(UserError):
    """A checkpoint file that cannot be read safely; the message names the file and the reason."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Unpickler(pickle.Unpickler):
    """Unpickler that knows only state_dict building blocks and reads storages from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self.path}: refusing to load '{module}.{name}': only tensors and dicts are "
            "accepted in a checkpoint (this file may run code when opened with torch.load)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent record {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError as err:
                raise CheckpointError(f"{self.path}: storage {key} is missing") from err
            self.storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self.storages[key]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """The view ``storage[offset:]`` with ``size`` and element ``stride``, copied to an array."""
    size, stride = tuple(size), tuple(stride)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if offset < 0 or min(size + stride, default=0) < 0 or (0 not in size and extent > len(storage)):
        raise CheckpointError(f"tensor view {size}/{stride}+{offset} lies outside its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def load_pth(path: paths.PathLike):
    """Load a ``torch.save`` zip file (local or in a bucket): tensors become NumPy arrays,
    dicts stay dicts."""
    path = paths.path(path)
    with path.open("rb") as stream:
        return _load_archive(stream, path)


def _load_archive(stream, path: Path):
    if not zipfile.is_zipfile(stream):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (files saved with torch < 1.6 or other "
            "formats are not supported; re-save it with a recent torch.save)"
        )
    with zipfile.ZipFile(stream) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        names = archive.namelist()
        has_order = prefix + "byteorder" in names
        byteorder = archive.read(prefix + "byteorder").decode() if has_order else "little"
        if byteorder != "little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as file:
            try:
                return _Unpickler(file, archive, prefix, path).load()
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{path}: cannot read the pickled state: {err}") from err
