"""Peers for the fleet tests (README "Fleets"): what stands between many nodes and the internet.
Everything binds to 127.0.0.1; each works outside pytest too.

* :func:`start_pull_through` -> :class:`PullThroughPeer`: a second real ``docker-registry``
  (distribution 2.8) configured as a pull-through cache (``proxy: remoteurl: URL``), behind its
  own counting proxy (a :class:`~peers.registry.RegistryPeer`: ``host``, ``requests``,
  ``blob_gets()``...).  Point ``remote_url`` at a test registry's counting proxy
  (``http://`` + ``registry.host``) so that registry's records show what the cache fetched.
  What distribution 2.8 does as a cache: it will not start while ``remote_url`` is unreachable
  (break the remote after the start); a blob it does not have is streamed to the client from
  the remote *and* fetched a second time in the background to store it (two GETs upstream per
  new blob; poll its ``storage_dir`` before counting on it); a tag is checked upstream (a
  ``HEAD``) on every manifest GET, content it stored is served without asking.
* :func:`start_tinyproxy` -> :class:`Tinyproxy`: Debian's ``tinyproxy`` (a real forward proxy:
  absolute-URI requests and ``CONNECT``) in the foreground with a generated config
  (``Allow 127.0.0.1``; ``BasicAuth`` with ``auth=(user, password)``, tinyproxy takes only
  ``[A-Za-z0-9_.-]`` there; ``ConnectPort`` lines with ``connect_ports``, else any port).
  ``requests()`` parses its log: one :class:`ProxiedRequest` (``method``, ``target``) per request
  line it read, whether it then served it or refused it (a ``407`` too).
* :func:`make_pki` -> :class:`Pki`: a private CA (``ca_path``) and a server certificate signed by
  it for ``127.0.0.1`` and ``localhost`` (``cert_path``/``key_path``), made with ``cryptography``.
  ``other_ca_path`` is an unrelated CA (a bundle that trusts something else).
* :func:`start_tls_nginx` -> :class:`TlsNginx`: nginx with TLS on 127.0.0.1 serving
  ``root/NAME`` at ``https://127.0.0.1:PORT/files/NAME`` (``put(name, data)`` returns that URL);
  ``uris()`` lists the request URIs it logged.
* :class:`TlsFront`: a TLS-terminating TCP relay (``https://127.0.0.1:PORT``, the pki's server
  certificate) in front of any plain TCP server: with a :class:`Tinyproxy` behind it, an HTTPS
  forward proxy with a private CA.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peers import ChildProcess, spawn_logged, start_on_free_ports
from peers.nginx import (
    NginxProcess,
    config_head,
    nginx_errors,
    nginx_prefix,
    quote,
    spawn_nginx,
    temp_paths,
)
from peers.registry import RegistryPeer

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only type checkers read it

# --------------------------------------------------------------------------------------------
# a pull-through cache


class PullThroughPeer(RegistryPeer):
    """``docker-registry`` as a pull-through cache of ``remote_url``, behind a counting proxy."""

    def __init__(self, workdir: str, remote_url: str, **proxy_options: Any) -> None:
        self.remote_url = remote_url
        super().__init__(workdir, **proxy_options)

    def _config(self, storage: str, port: int) -> str:
        return super()._config(storage, port) + f"proxy:\n  remoteurl: {self.remote_url}\n"


def start_pull_through(workdir: str, remote_url: str, **proxy_options: Any) -> PullThroughPeer:
    """Start a pull-through cache of ``remote_url`` (``close()`` it, or use ``with``)."""
    return PullThroughPeer(workdir, remote_url, **proxy_options)


# --------------------------------------------------------------------------------------------
# a forward proxy

_REQUEST_RE = re.compile(r"\]: Request \(file descriptor \d+\): (?P<method>[A-Z]+) (?P<target>\S+)")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str  # an absolute URI, or HOST:PORT for CONNECT


class Tinyproxy(ChildProcess):
    """A running ``tinyproxy -d``; ``url`` (``http://127.0.0.1:PORT``), ``auth_url``
    (with ``user:password@`` when it wants them), ``log_path``."""

    def __init__(
        self, workdir: Path, port: int, auth: tuple[str, str] | None, proc: subprocess.Popen[bytes]
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.auth = auth
        self.url = f"http://127.0.0.1:{port}"
        self.auth_url = f"http://{auth[0]}:{auth[1]}@127.0.0.1:{port}" if auth else self.url
        self.log_path = workdir / "tinyproxy.log"
        self._proc = proc
        self._mark = 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self) -> list[ProxiedRequest]:
        """The requests read since the last :meth:`clear` (tinyproxy logs a request line before
        it connects anywhere, so one a client has had an answer to is already there)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._mark)
            text = f.read().decode("utf-8", "replace")
        return [
            ProxiedRequest(m.group("method"), m.group("target")) for m in _REQUEST_RE.finditer(text)
        ]

    def targets(self) -> list[str]:
        return [r.target for r in self.requests()]

    def clear(self) -> None:
        self._mark = self.log_path.stat().st_size


def _tinyproxy_config(
    workdir: Path, port: int, auth: tuple[str, str] | None, connect_ports: list[int] | None
) -> str:
    lines = [
        "# generated by tests/peers/fleet.py",
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        f"LogFile {quote(workdir / 'tinyproxy.log')}",
        "LogLevel Info",
        "MaxClients 64",
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
    ]
    if os.geteuid() == 0:
        lines.append("User root")  # or it warns; the log file is ours
    if auth:
        if not all(_TOKEN_RE.match(x) for x in auth):
            raise ValueError(f"tinyproxy's BasicAuth takes only [A-Za-z0-9_.-]: {auth!r}")
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    for p in connect_ports or []:
        lines.append(f"ConnectPort {int(p)}")
    return "\n".join(lines) + "\n"


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def start_tinyproxy(
    workdir: Path, auth: tuple[str, str] | None = None, connect_ports: list[int] | None = None
) -> Tinyproxy:
    """Start tinyproxy in the foreground with its config and log in ``workdir``."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def spawn(ports: list[int]) -> Tinyproxy:
        (port,) = ports
        conf = workdir / "tinyproxy.conf"
        conf.write_text(_tinyproxy_config(workdir, port, auth, connect_ports))
        (workdir / "tinyproxy.log").write_bytes(b"")
        proc = spawn_logged([binary, "-d", "-c", str(conf)], workdir / "stderr.log")
        return Tinyproxy(workdir, port, auth, proc)

    return start_on_free_ports(
        1,
        spawn,
        lambda p: _listening(p.port),
        lambda p: (workdir / "stderr.log").read_text(errors="replace") + p.log_text(),
        failure=f"tinyproxy did not start in {workdir}",
    )


# --------------------------------------------------------------------------------------------
# a private CA


@dataclass
class Pki:
    ca_path: Path  # the CA certificate (PEM): what --ca-cert is given
    cert_path: Path  # the server certificate for 127.0.0.1 and localhost, signed by the CA
    key_path: Path
    other_ca_path: Path  # an unrelated CA


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _ca(name: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1/localhost in ``directory`` (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("nekko test CA")
    _, other_cert = _ca("nekko unrelated CA")
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pki = Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "other-ca.pem",
    )
    pki.ca_path.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca_path.write_bytes(other_cert.public_bytes(pem))
    pki.cert_path.write_bytes(cert.public_bytes(pem))
    pki.key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(pki.key_path, 0o600)
    return pki


# --------------------------------------------------------------------------------------------
# nginx with TLS


def _tls_nginx_config(prefix: Path, root: Path, port: int, pki: Pki) -> str:
    return (
        config_head(prefix, "tests/peers/fleet.py")
        + f"""events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    server_tokens off;
{temp_paths(prefix)}
    log_format uris '$request_method $request_uri $status';
    access_log {quote(prefix / "access.log")} uris;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name 127.0.0.1 localhost;
        ssl_certificate {quote(pki.cert_path)};
        ssl_certificate_key {quote(pki.key_path)};
        location = /__ping {{ return 204; }}
        location /files/ {{ alias {quote(f"{root}/")}; }}
        # an https -> http downgrade (to a loopback port nothing should ever be asked on)
        location = /downgrade {{ return 302 http://127.0.0.1:9/files/x; }}
    }}
}}
"""
    )


class TlsNginx(NginxProcess):
    """nginx serving ``https://127.0.0.1:PORT/files/NAME`` with the pki's server certificate."""

    def __init__(
        self, prefix: Path, root: Path, port: int, pki: Pki, proc: subprocess.Popen[bytes]
    ) -> None:
        super().__init__(prefix, root, port, proc, scheme="https")
        self.pki = pki

    def uris(self) -> list[str]:
        """``"GET /files/NAME 200"`` for each request logged (nginx writes a line once the
        answer is sent: a caller that just had one may have to wait a moment)."""
        path = self.prefix / "access.log"
        return [
            line for line in path.read_text(errors="replace").splitlines() if "/__ping" not in line
        ]


def _tls_answers(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=1, context=ctx)
    try:
        conn.request("GET", "/__ping")
        return conn.getresponse().status == 204
    except OSError:
        return False
    finally:
        conn.close()


def start_tls_nginx(workdir: Path, pki: Pki) -> TlsNginx:
    """Start nginx with TLS, its prefix in ``workdir`` (files in ``workdir/root``)."""
    prefix, root = nginx_prefix(workdir)

    def spawn(ports: list[int]) -> TlsNginx:
        (port,) = ports
        proc = spawn_nginx(prefix, _tls_nginx_config(prefix, root, port, pki))
        return TlsNginx(prefix, root, port, pki, proc)

    return start_on_free_ports(
        1,
        spawn,
        lambda p: _tls_answers(p.port, pki.ca_path),
        lambda p: nginx_errors(prefix),
        failure=f"nginx (TLS) did not start in {prefix}",
        in_use="Address already in use",
    )


# --------------------------------------------------------------------------------------------
# a TLS front for a plain TCP server


class TlsFront:
    """``https://127.0.0.1:PORT`` (``url``): TLS with the pki's server certificate, the plain
    bytes relayed to ``backend`` (host, port).  ``connections`` counts the handshakes done."""

    def __init__(self, backend: tuple[str, int], pki: Pki) -> None:
        self.backend = backend
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki.cert_path), str(pki.key_path))
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"tlsfront:{self.port}").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            tls = self.ctx.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()
            return
        with self._lock:
            self.connections += 1
        try:
            upstream = socket.create_connection(self.backend, timeout=10)
        except OSError:
            tls.close()
            return
        with self._lock:
            self._conns += [tls, upstream]
        tls.settimeout(None)
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    if dst is upstream:
                        dst.shutdown(socket.SHUT_WR)  # the client is done sending
                    else:
                        dst.close()  # the backend is done: so is the client's connection

        t = threading.Thread(target=pump, args=(upstream, tls), daemon=True)
        t.start()
        pump(tls, upstream)
        t.join(30)
        for s in (tls, upstream):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
