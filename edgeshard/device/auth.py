"""Shared-secret mutual authentication (HMAC-SHA256 challenge-response) for control and data connections.

Every TCP connection to a device server, rpyc control or data plane, starts with this handshake before
anything else is exchanged. Nothing secret crosses the wire: both sides prove they hold the token by an HMAC
over two fresh nonces, bound to the connection's purpose ("control" or "data"), so a recorded handshake
cannot be replayed and a control handshake cannot be reused on the data plane.

    client -> server   CLIENT_HELLO (8 bytes)
    server -> client   SERVER_HELLO (8) + server nonce (32)
    client -> server   client nonce (32) + HMAC(secret, "client" | purpose | sn | cn)   (32)
    server -> client   b"\\x01" + HMAC(secret, "server" | purpose | sn | cn)              (accepted)
                       REFUSAL text, then close                                          (refused)

A peer that says anything else, or too little within the timeout, gets REFUSAL and nothing else: no nonce
when the hello is wrong, no rpyc, no tensor bytes. The client checks the server's HMAC too, so a controller
never sends prompts to an impostor. TLS is not implemented (traffic is authenticated, not encrypted): run
devices on a trusted network or inside a VPN/SSH tunnel.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
import time
from pathlib import Path

from edgeshard.config import paths

CLIENT_HELLO = b"ESHELO1\n"
SERVER_HELLO = b"ESAUTH1\n"
NONCE_BYTES = 32
MAC_BYTES = 32
ACCEPTED = b"\x01"
REFUSAL = b"EDGESHARD REFUSED: authentication failed (missing or wrong token; see --token-file)\n"
MIN_SECRET_CHARS = 16
DEFAULT_TIMEOUT_S = 10.0


class AuthError(ConnectionError):
    """The peer did not prove it holds the shared secret (or is not an edgeshard peer)."""


def default_token_path() -> Path:
    return paths.home() / "token"


def create_token_file(path: str | Path) -> Path:
    """Write a fresh random 256-bit hex secret to path, readable by its owner only (0600). Refuses to overwrite."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def ensure_token_file(path: str | Path | None = None) -> Path:
    """The token file at path (default $EDGESHARD_HOME/token), created 0600 if it does not exist."""
    path = Path(path) if path else default_token_path()
    if not path.exists():
        try:
            create_token_file(path)
        except FileExistsError:  # created concurrently
            pass
    return path


def load_secret(path: str | Path | None = None) -> bytes:
    """The shared secret in a token file (surrounding whitespace ignored)."""
    path = Path(path) if path else default_token_path()
    try:
        text = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as e:
        raise AuthError(f"cannot read token file {path}: {e.strerror} "
                        f"(create one with a random secret, e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > {path}`"
                        f" and chmod 600)") from None
    if len(text) < MIN_SECRET_CHARS:
        raise AuthError(f"token file {path} holds {len(text)} characters; use a random secret of at least "
                        f"{MIN_SECRET_CHARS} (32 hex bytes recommended)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        import warnings
        warnings.warn(f"token file {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it",
                      stacklevel=2)
    return text.encode()


def _mac(secret: bytes, role: bytes, purpose: bytes, sn: bytes, cn: bytes) -> bytes:
    return hmac.new(secret, role + b"|" + purpose + b"|" + sn + cn, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise AuthError(f"peer closed the connection during the handshake ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def _refuse(sock: socket.socket) -> None:
    """Send REFUSAL, then read and drop what the peer already sent (closing a socket with unread input sends
    a TCP reset, which could destroy the refusal before the peer reads it)."""
    try:
        sock.sendall(REFUSAL)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.5)
        drained, deadline = 0, time.monotonic() + 1.0
        while drained < (1 << 16) and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def server_handshake(sock: socket.socket, secret: bytes, purpose: bytes, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Authenticate an accepted socket; on failure send REFUSAL and raise AuthError (the caller closes)."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        try:
            hello = _recv_exact(sock, len(CLIENT_HELLO))
        except (AuthError, OSError) as e:
            _refuse(sock)
            raise AuthError(f"no client hello: {e}") from None
        if hello != CLIENT_HELLO:
            _refuse(sock)
            raise AuthError("not an edgeshard client (wrong hello)")
        sn = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(SERVER_HELLO + sn)
        try:
            reply = _recv_exact(sock, NONCE_BYTES + MAC_BYTES)
        except (AuthError, OSError) as e:
            _refuse(sock)
            raise AuthError(f"no challenge response: {e}") from None
        cn, mac = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
        if not hmac.compare_digest(mac, _mac(secret, b"client", purpose, sn, cn)):
            _refuse(sock)
            raise AuthError("wrong token")
        sock.sendall(ACCEPTED + _mac(secret, b"server", purpose, sn, cn))
    finally:
        sock.settimeout(old)


def _refusal_text(sock: socket.socket, first: bytes) -> str:
    """What a refusing server said: the bytes already read plus whatever else it sent before closing."""
    rest = b""
    try:
        rest = sock.recv(256)
    except OSError:
        pass
    return (first + rest).decode(errors="replace").strip()


def client_handshake(sock: socket.socket, secret: bytes, purpose: bytes, timeout: float = DEFAULT_TIMEOUT_S,
                     where: str = "server") -> None:
    """Prove the secret to the server and check the server's proof; AuthError with a clear reason otherwise."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.sendall(CLIENT_HELLO)
        first = _recv_exact(sock, len(SERVER_HELLO))
        if first != SERVER_HELLO:
            raise AuthError(f"{where} refused the connection: {_refusal_text(sock, first)!r}")
        sn = _recv_exact(sock, NONCE_BYTES)
        cn = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(cn + _mac(secret, b"client", purpose, sn, cn))
        status = _recv_exact(sock, 1)
        if status != ACCEPTED:
            raise AuthError(f"{where} refused our token: {_refusal_text(sock, status)!r} "
                            f"(do both sides use the same --token-file?)")
        smac = _recv_exact(sock, MAC_BYTES)
        if not hmac.compare_digest(smac, _mac(secret, b"server", purpose, sn, cn)):
            raise AuthError(f"{where} could not prove it holds the token: not our device server")
    except socket.timeout:
        raise AuthError(f"{where}: authentication handshake timed out after {timeout:.0f} s") from None
    finally:
        sock.settimeout(old)


def connect(host: str, port: int, secret: bytes, purpose: bytes, timeout: float = DEFAULT_TIMEOUT_S,
            where: str | None = None) -> socket.socket:
    """A TCP connection (TCP_NODELAY) that passed the handshake."""
    where = where or f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot connect to {where} ({host}:{port}): {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client_handshake(sock, secret, purpose, timeout, where)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock
