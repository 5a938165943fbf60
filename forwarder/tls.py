"""Client TLS contexts: one builder for the check at load and for the connections.

`client_context()` is what a wss:// connection uses, and what `load_config` builds once for
every configured set of TLS files (sources and `[redis]`), so a file that would fail at the
first connection is a configuration error naming its key instead. `tls_context()` caches one
context per set of files for the subscribers and rebuilds it when a file changes, so a renewed
client certificate needs no restart.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.errors import ConnectFailed, TLSFileError, UnreadableFile
from forwarder.files import read_regular_file

if TYPE_CHECKING:
    from forwarder.config import SourceConfig

TLS_FILE_LIMIT = 1024 * 1024  # bytes; a CA bundle is ~200 KiB, a certificate a few KiB


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKey


def client_context(
    ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> ssl.SSLContext:
    """A client context: TLS 1.2 or later, the server's certificate and host name verified
    against `ca_file` (default: the system trust store), and the client certificate if set.

    Reads only regular files (see files.py). Raises TLSFileError naming the setting whose
    file cannot be used, with the reason.
    """
    for setting, path in (
        ("ca_file", ca_file),
        ("client_cert", client_cert),
        ("client_key", client_key),
    ):
        if path is not None:
            try:
                read_regular_file(path, TLS_FILE_LIMIT)
            except UnreadableFile as exc:
                raise TLSFileError(setting, f"cannot read {path}: {exc}") from None
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TLSFileError(
            "ca_file", f"{ca_file} holds no usable PEM CA certificate ({exc})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        setting = "client_key" if client_key else "client_cert"
        try:
            context.load_cert_chain(client_cert, client_key, password=_no_password)
        except _EncryptedKey:
            raise TLSFileError(
                setting,
                "the private key is encrypted; forwarder cannot ask for a passphrase: store "
                "it unencrypted, readable only by the service (e.g. as a systemd credential)",
            ) from None
        except (OSError, ValueError) as exc:
            hint = "" if client_key else "; if the key is in a separate file, set client_key"
            also = f" and {client_key}" if client_key else ""
            raise TLSFileError(
                "client_cert",
                f"cannot load a PEM certificate and its private key from {client_cert}{also} "
                f"({exc}){hint}",
            ) from None
    return context


# One context per set of files (sources with the same files share it), rebuilt when a file
# changes. Guarded by _tls_lock: subscriber threads call tls_context() concurrently.
_tls_lock = threading.Lock()
_tls_contexts: dict[tuple[Path | None, ...], tuple[tuple[int, ...], ssl.SSLContext]] = {}


def tls_context(source: SourceConfig) -> ssl.SSLContext | None:
    """The TLS context of a wss:// source (None for ws://), see `client_context`.

    Thread-safe. Raises ConnectFailed when a file became unusable since the start.
    """
    if not source.url.startswith("wss:"):
        return None
    files = (source.ca_file, source.client_cert, source.client_key)
    try:
        stamp = tuple(path.stat().st_mtime_ns for path in files if path is not None)
    except OSError as exc:
        raise ConnectFailed(f"TLS files of source {source.name}: {exc.strerror or exc}") from None
    with _tls_lock:
        cached = _tls_contexts.get(files)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            context = client_context(*files)
        except TLSFileError as exc:
            raise ConnectFailed(
                f"TLS files of source {source.name}: {exc.setting}: {exc}"
            ) from None
        _tls_contexts[files] = (stamp, context)
        return context
