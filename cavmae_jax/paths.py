"""One path type for local files and Cloud Storage (``gs://bucket/...``): ``etils.epath``.

Workdirs, model directories, checkpoints, metrics, figures, ``.pth`` files and prepared datasets
may all live in a bucket (TPU pods keep them there). ``epath`` goes through ``gcsfs`` for
``gs://``: set here as the default (``EPATH_USE_TF=false``) so that the tested path is the one
that runs, and because ``gcsfs``, unlike TensorFlow's own client, can be pointed at a local
Cloud Storage server (``STORAGE_EMULATOR_HOST``). Orbax writes arrays through TensorStore
(``TENSORSTORE_GCS_HTTP_URL`` for a local server). TensorFlow still reads the prepared shards
(``tf.data``) with its own client, which has no endpoint setting.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

Path = epath.Path
PathLike = str | os.PathLike


def path(value: PathLike) -> epath.Path:
    """``value`` as a path: a bucket path as it is, a local one made absolute (Orbax and the
    subprocesses of ``cavmae prepare`` need absolute paths)."""
    if is_remote(value):
        return epath.Path(value)
    return epath.Path(os.path.abspath(os.fspath(value)))


def is_remote(value: PathLike) -> bool:
    return "://" in os.fspath(value)


def save_figure(figure, destination: PathLike, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG file, local or in a bucket."""
    with path(destination).open("wb") as f:
        figure.savefig(f, format="png", dpi=dpi)


@contextlib.contextmanager
def local_copy(source: PathLike) -> Iterator[str]:
    """A local file name for ``source``: itself, or a temporary copy of a bucket object (for
    decoders that read only local files, e.g. FFmpeg)."""
    if not is_remote(source):
        yield os.fspath(source)
        return
    remote = path(source)
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, remote.name)
        with open(local, "wb") as f:
            f.write(remote.read_bytes())
        yield local


def publish(destination: PathLike, write: Callable[[str], None]) -> None:
    """Write ``destination`` whole or not at all: ``write(file name)`` fills a temporary file,
    which is then renamed into place on disk or uploaded as one object to a bucket (an object
    appears complete or not at all), so an interrupted run never leaves a partial file."""
    destination = path(destination)
    if is_remote(destination):
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, destination.name)
            write(local)
            with open(local, "rb") as f:
                _upload(_bucket_key(destination), f.read())
        return
    temporary = os.fspath(destination) + ".tmp"
    write(temporary)
    os.replace(temporary, destination)


def save_array(destination: PathLike, array) -> None:
    """A NumPy ``.npy`` file, local or in a bucket, written whole or not at all."""
    import numpy as np

    def write(local: str) -> None:
        with open(local, "wb") as f:
            np.save(f, array)

    publish(destination, write)


def append(destination: PathLike, data: bytes) -> None:
    """Add ``data`` at the end of ``destination``. A bucket object cannot grow: the new bytes
    go up as an object of their own, which Cloud Storage then joins to the end of the old one
    (compose, on the server), so each byte is uploaded once however long the file gets."""
    destination = path(destination)
    if not is_remote(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(destination, "ab") as f:
            f.write(data)
        return
    storage = _storage()
    whole = _bucket_key(destination)
    storage.invalidate_cache(whole)  # a listing cached before the last append is stale
    if not storage.exists(whole):
        _upload(whole, data)
        return
    part = f"{whole}.part"
    _upload(part, data)
    storage.merge(whole, [whole, part])
    storage.rm(part)


def _storage():
    import gcsfs

    return gcsfs.GCSFileSystem()


def _bucket_key(destination: epath.Path) -> str:
    return os.fspath(destination).removeprefix("gs://")


def _upload(key: str, data: bytes) -> None:
    """``data`` as the object ``key``, sent as one resumable upload, whose body is the bytes
    themselves. gcsfs sends smaller data in one request as a MIME part that ends with a line
    feed and the boundary; a parser that reads a carriage return before that line feed as part
    of the line end drops the data's last byte when it is a carriage return (the local Cloud
    Storage server of the tests does: one binary file in 256 would lose a byte)."""
    _storage().pipe(key, data, chunksize=max(len(data), 1))


def files(folder: PathLike) -> Iterator[epath.Path]:
    """Every file under ``folder``, recursively (``epath`` has no ``rglob``)."""
    for item in path(folder).iterdir():
        if item.is_dir():
            yield from files(item)
        else:
            yield item
