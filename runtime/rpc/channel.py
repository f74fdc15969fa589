"""An authenticated, encrypted channel between huatuo-local's RPC client and its workers.

llama.cpp's RPC protocol has neither: whoever reaches a worker's port can run computations in it and read
what it holds, and llama.cpp's server serves one connection at a time, so any user of the machine holding
one idle connection locks everyone else out. With a key, the worker listens with TLS and accepts only
clients holding the same key; llama.cpp's own server listens where only the worker reaches it; and the
client reaches the worker through TLS from its relay (runtime/rpc/relay.py). llama.cpp's bytes pass
through unchanged inside.

The key is one file, made by `huatuo-local rpc-worker --init-key FILE` and copied to each client machine:
a self-signed certificate and its private key (ECDSA P-256). Each side presents it and accepts only a peer
presenting the same certificate (mutual TLS 1.3 with that certificate as the only authority), so the file
is both the password and what makes the channel private. It is refused unless only its owner can read it.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from pathlib import Path

from huatuo_local.models.errors import HuatuoError
from huatuo_local.models.private import read_secret

HANDSHAKE_TIMEOUT_S = 10  # a connection that does not finish TLS within this is dropped
KEY_NAME = "huatuo-local-rpc"


def make_key(path: Path) -> Path:
    """Write a new key file (certificate + private key, PEM, 0600); refuses to overwrite one."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    path = Path(path).expanduser()
    if path.exists():
        raise HuatuoError(f"{path}: exists already; remove it first or choose another file (clients holding the "
                          "old key would be locked out)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KEY_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = (cert.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def _context(key_file: Path, server: bool) -> ssl.SSLContext:
    """TLS 1.3 presenting the key file's certificate and trusting nothing but that same certificate."""
    pem = read_secret(key_file, "the RPC key")
    if "BEGIN CERTIFICATE" not in pem or "PRIVATE KEY" not in pem:
        raise HuatuoError(f"{key_file}: not an RPC key file; make one with `huatuo-local rpc-worker --init-key FILE`")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is identified by its certificate alone, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    # ssl reads certificates and keys from files only: a private temporary copy, removed at once.
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as tmp:
        os.chmod(tmp.name, 0o600)
        tmp.write(pem)
    try:
        ctx.load_cert_chain(tmp.name)
        ctx.load_verify_locations(tmp.name)
    except ssl.SSLError as exc:
        raise HuatuoError(f"{key_file}: not a usable RPC key ({exc.reason or exc})") from None
    finally:
        os.unlink(tmp.name)
    return ctx


def server_context(key_file: Path) -> ssl.SSLContext:
    return _context(key_file, server=True)


def client_context(key_file: Path) -> ssl.SSLContext:
    return _context(key_file, server=False)


def connect(endpoint: str, context: ssl.SSLContext | None, timeout: float) -> socket.socket:
    """A connection to a worker: plain TCP, or TLS with the key when `context` is given."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        raise HuatuoError(f"RPC worker {endpoint}: unreachable ({exc.strerror or exc}); start it there with "
                          f"`huatuo-local rpc-worker --port {port}` (or check the address and the tunnel)") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_side=False)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise HuatuoError(f"RPC worker {endpoint}: the secure connection failed ({getattr(exc, 'reason', None) or exc}"
                          "); is it started with the same --key-file as this --rpc-key-file?") from None


_BRIDGE_BUFFER = 4 << 20


def plain_end(tls: ssl.SSLSocket) -> socket.socket:
    """A plain socket whose bytes are `tls`'s, both ways, for code that reads and writes from two threads.

    OpenSSL does not allow one connection to be used by two threads at once, and llama.cpp's stream is full
    duplex (asynchronous commands go down while answers come up): one thread alone drives `tls`, without
    blocking on either direction, and hands the bytes over a socket pair. Closing the returned socket closes
    the TLS connection; the TLS connection closing closes it."""
    import threading

    mine, theirs = socket.socketpair()
    for s in (tls, mine):
        s.setblocking(False)

    def drive() -> None:
        import select

        to_tls, to_plain = bytearray(), bytearray()
        tls_open = plain_open = True
        try:
            while (tls_open or to_tls) and (plain_open or to_plain):
                reads = ([tls] if tls_open and len(to_plain) < _BRIDGE_BUFFER else []) + \
                        ([mine] if plain_open and len(to_tls) < _BRIDGE_BUFFER else [])
                writes = ([tls] if to_tls else []) + ([mine] if to_plain else [])
                ready = tls in reads and tls.pending()
                r, w, _ = select.select(reads, writes, [], 0 if ready else 1.0)
                if ready and tls not in r:
                    r.append(tls)
                if tls in r:
                    try:
                        data = tls.recv(1 << 20)
                        if data:
                            to_plain += data
                        else:
                            tls_open = False
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                if mine in r:
                    data = mine.recv(1 << 20)
                    if data:
                        to_tls += data
                    else:
                        plain_open = False
                if tls in w and to_tls:
                    try:
                        del to_tls[:tls.send(to_tls[: 1 << 20])]
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                if mine in w and to_plain:
                    del to_plain[:mine.send(to_plain[: 1 << 20])]
        except OSError:
            pass
        finally:
            for s in (tls, mine):
                try:
                    s.close()
                except OSError:
                    pass

    threading.Thread(target=drive, name="huatuo-rpc-tls", daemon=True).start()
    theirs.setblocking(True)
    return theirs
