"""Where shards live: a local path, or a URI (``s3://bucket/prefix``, ``gs://...``, any pyarrow or fsspec filesystem).

Pure helpers over ``pyarrow.fs``. A local path is read as a plain file, exactly as before; a URI goes through
``pyarrow.fs.FileSystem.from_uri``, else through fsspec (``PyFileSystem(FSSpecHandler(...))``) for the schemes
only fsspec knows. Credentials come the usual way (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
an instance role) and are never logged. An S3-compatible server: ``AWS_ENDPOINT_URL`` (pyarrow reads it), or
``s3://bucket/prefix?endpoint_override=host:port&scheme=http`` in the URI itself (the query goes with every
path below that root).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.data.errors import DataError

_ARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file", "abfs", "abfss")


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (a bucket or any remote filesystem); False for a local path."""
    return "://" in str(path)


def local_path(location: str) -> str | None:
    """The local path a storage location names (a plain path or a `file:` URI), or None for a URI of storage
    reached over the network (`s3://`, `gs://`, any other `scheme://`)."""
    if location.startswith("file:"):
        return location[len("file:"):].removeprefix("//")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location):
        return None
    return location


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URI (a URI's ``?query`` stays at the end)."""
    if not is_uri(root):
        return os.path.join(root, name)
    base, q, query = root.partition("?")
    return f"{base.rstrip('/')}/{name}{q}{query}"


def display(path: str) -> str:
    """A path or URI as shown in messages: without its query and without any ``user:secret@`` part."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", str(path).partition("?")[0])


def _uri_filesystem(scheme: str, netloc: str, query: str) -> tuple[Any, bool]:
    """(filesystem, whether pyarrow parses its paths) for one scheme + authority + query, made once per setting
    of the environment's credentials and endpoint."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))
    return _made_filesystem(scheme, netloc, query, env)


@lru_cache(maxsize=32)
def _made_filesystem(scheme: str, netloc: str, query: str, env: tuple) -> tuple[Any, bool]:
    uri = f"{scheme}://{netloc}/{'?' + query if query else ''}"
    try:
        return pafs.FileSystem.from_uri(uri)[0], True
    except Exception as arrow_exc:  # noqa: BLE001 - a scheme pyarrow does not know: try fsspec
        if scheme in _ARROW_SCHEMES:  # pyarrow's own: its error says what is wrong (region, endpoint, credentials)
            raise DataError(f"cannot open {display(uri)}: {type(arrow_exc).__name__}: {arrow_exc} (an S3-compatible "
                            "server: set AWS_ENDPOINT_URL, or add ?endpoint_override=HOST:PORT&scheme=http to the "
                            "URI)") from None
        try:
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs, _ = fsspec.core.url_to_fs(uri)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"no filesystem for {display(uri)} ({type(exc).__name__}: {exc})") from None
        return PyFileSystem(FSSpecHandler(fs)), False


def filesystem(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) of a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    parts = urlsplit(path)
    fs, native = _uri_filesystem(parts.scheme, parts.netloc, parts.query)
    if parts.scheme == "file":
        return fs, parts.path
    if native and parts.scheme not in ("s3", "gs", "gcs"):
        return fs, pafs.FileSystem.from_uri(path)[1]
    if not native:
        import fsspec

        return fs, fsspec.core.url_to_fs(display(path))[1]
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def list_files(root: str, suffix: str) -> list[tuple[str, int]]:
    """(name, bytes) of the files directly in ``root`` whose name ends with ``suffix``, by name.

    Raises :class:`DataError` when ``root`` does not exist (or cannot be listed).
    """
    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=False))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot list {display(root)}: {type(exc).__name__}: {exc}") from None
    found = [(i.base_name, int(i.size or 0)) for i in infos
             if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith(".")]
    return sorted(found)


def file_size(path: str) -> int | None:
    """Bytes of a file, or None when there is no file at ``path``."""
    if not is_uri(path):
        return os.path.getsize(path) if os.path.isfile(path) else None
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    return int(info.size) if info.type == pafs.FileType.File else None


def is_dir(path: str) -> bool:
    """True when ``path`` is a directory (for a bucket: a prefix holding objects, or the bucket itself)."""
    if not is_uri(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p).type == pafs.FileType.Directory
    except OSError:
        return False


def read_bytes(path: str) -> bytes:
    """The whole content of a (small) file."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with fs.open_input_stream(p, compression=None) as f:
        return f.read()


def open_random(path: str):
    """A file object for seeks and ranged reads (for a URI, each read is one ranged request)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def open_stream(path: str, buffer_size: int = 1 << 20):
    """A buffered, sequential, forward-only file object (one request for a URI, however many reads)."""
    if not is_uri(path):
        return open(path, "rb", buffering=buffer_size)
    fs, p = filesystem(path)
    return fs.open_input_stream(p, compression=None, buffer_size=buffer_size)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole (small) file: a local one through a temporary name renamed into place, an object at once
    (an object store shows an object whole or not at all)."""
    if not is_uri(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


def upload(local: str, path: str, chunk: int = 8 << 20) -> None:
    """Copy the local file ``local`` to ``path`` (a URI), streamed in chunks."""
    fs, p = filesystem(path)
    with open(local, "rb") as src, fs.open_output_stream(p) as dst:
        while block := src.read(chunk):
            dst.write(block)

