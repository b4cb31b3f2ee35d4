"""Where nekko-sm may connect (DESIGN section 10): the egress policy.

The daemon fetches whatever URL a caller names, so without a policy it is a proxy into the
node's own network: the cloud metadata service (instance credentials), link-local services.
:class:`Policy` refuses those by default and takes ``--deny-network``/``--allow-network``
CIDRs for the rest; the most specific network that holds an address decides (an allow of
the same network as a deny wins), and an address in no listed network is allowed.

It is enforced twice for every hop of every request (redirects included):

* :meth:`Policy.check_url` before the request, on the URL's host as written: a denied name
  (``metadata.google.internal``) or an IP literal in a denied network (also in the legacy
  spellings the resolver accepts, ``0xa9fea9fe``, ``2852039166``).  With a proxy this is the
  only check, since the proxy resolves the name: the daemon does not resolve it itself.
* :func:`pool_manager` for direct connections: the connection resolves the name once, checks
  every address it got, and connects to those checked addresses only, so a DNS answer that
  changes between check and connect (rebinding) cannot slip an address past the check.

A refusal is :class:`~nekko_sm.errors.EgressDenied` (403 ``egress-denied``); it never says
more about the destination than the caller already gave.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Union
from urllib.parse import urlsplit

from nekko_sm import logs
from nekko_sm.errors import ConfigError, EgressDenied
from nekko_sm.record import dataclass

if TYPE_CHECKING:  # socket is imported where a name is resolved: not by status, path, ls
    import socket

log = logs.get("nekko_sm.egress")  # imports logging at its first use

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Link-local (where AWS, Azure, GCP, OpenStack and Oracle serve instance metadata, and the
# ECS/EKS credential endpoints live), AWS's IPv6 metadata address, Alibaba's metadata address.
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
# Names that reach a metadata service whatever a resolver says (GCP's, and its short form).
DENIED_NAMES = frozenset({"metadata.google.internal", "metadata"})

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_LEGACY = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def parse_networks(items: Iterable[str], what: str) -> tuple:
    """CIDRs (or bare addresses) from flags or the environment; a bad one is a ConfigError."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{what}: {item!r} is not a network (CIDR such as 10.0.0.0/8,"
                " fd00::/8, or one address)"
            ) from None
    return tuple(out)


def literal_address(host: str) -> Address | None:
    """``host`` as the IP address a resolver would take it for, or None for a name."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: the zone is no help
    except ValueError:
        pass
    if _IPV4_LEGACY.match(host):  # 0xa9fea9fe, 2852039166, 169.254.43518: inet_aton's forms
        import socket

        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Policy:
    deny: tuple = ()
    allow: tuple = ()
    names: frozenset = DENIED_NAMES

    @classmethod
    def build(cls, deny: Iterable[str] = (), allow: Iterable[str] = ()) -> Policy:
        return cls(
            parse_networks(DEFAULT_DENY, "default") + parse_networks(deny, "--deny-network"),
            parse_networks(allow, "--allow-network"),
        )

    def refusing(self, addr: Address) -> Network | None:
        """The network that denies ``addr``, or None when it may be reached."""
        for a in _embedded(addr):
            best: tuple[int, bool, Network] | None = None
            for allowed, nets in ((False, self.deny), (True, self.allow)):
                for net in nets:
                    if a.version == net.version and a in net:
                        cand = (net.prefixlen, allowed, net)
                        if best is None or cand[:2] > best[:2]:
                            best = cand
            if best is not None and not best[1]:
                return best[2]
        return None

    def check_host(self, host: str, port: int | None = None) -> None:
        """Refuse a denied name or a denied IP literal, without resolving anything."""
        name = host.strip("[]").rstrip(".").lower()
        where = f"{host}:{port}" if port else host
        if name in self.names:
            raise EgressDenied(
                f"{where} is a cloud metadata service, which nekko-sm does not fetch from"
            )
        addr = literal_address(name)
        if addr is not None:
            net = self.refusing(addr)
            if net is not None:
                raise EgressDenied(
                    f"{where} is in the denied network {net} (link-local and"
                    " cloud metadata addresses are refused by default; an"
                    " operator can change that with --allow-network)"
                )

    def check_url(self, url: str) -> None:
        p = urlsplit(url)
        if p.hostname:
            self.check_host(p.hostname)

    def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` once and return its addresses, all of them checked.

        One denied address refuses the host: a name that answers both an allowed and a
        denied address is not one to trust with the next connection.
        """
        self.check_host(host, port)
        infos = resolve(host.strip("[]"), port)
        addrs: list[str] = []
        for info in infos:
            ip = str(info[4][0]).split("%", 1)[0]
            net = self.refusing(ipaddress.ip_address(ip))
            if net is not None:
                log.warning(
                    "egress denied: %s:%d resolves to %s, in the denied network %s",
                    host,
                    port,
                    ip,
                    net,
                )
                raise EgressDenied(
                    f"{host}:{port} resolves to an address in a denied network"
                    " (link-local and cloud metadata addresses are refused by"
                    " default; an operator can change that with --allow-network)"
                )
            if info[4][0] not in addrs:
                addrs.append(str(info[4][0]))
        return addrs


def _embedded(addr: Address) -> list[Address]:
    """``addr`` and the IPv4 address it carries, if any (::ffff:a.b.c.d, 64:ff9b::a.b.c.d)."""
    out: list[Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            out.append(addr.ipv4_mapped)
        elif addr in _NAT64:
            out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


def resolve(host: str, port: int) -> list:
    """``getaddrinfo`` as urllib3 would call it (a seam for tests' resolver stubs)."""
    import socket

    from urllib3.util.connection import allowed_gai_family

    return socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)


# --------------------------------------------------------------------------------------------
# urllib3 connections that connect only to checked addresses


class _Checked:
    """Mixed into urllib3's HTTP(S)Connection: resolve once, check, connect to what was checked.

    TLS still verifies the certificate for the name (``self.host`` is the name again by the
    time the handshake starts); only the TCP connect is pointed at the address.
    """

    policy: Policy
    _dns_host: str
    port: int
    host: str

    def _new_conn(self) -> socket.socket:
        import socket

        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

        name = self._dns_host
        try:
            addrs = self.policy.resolve(name, self.port)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        last: Exception | None = None
        try:
            for ip in addrs:
                self._dns_host = ip
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except ConnectTimeoutError as e:  # refused, unreachable, timed out: the next one
                    last = e
        finally:
            self._dns_host = name
        assert last is not None
        raise last


def pool_manager(
    policy: Policy,
    http_base=None,
    https_base=None,  # type: ignore[no-untyped-def]
    **kw,
):
    """A urllib3 PoolManager whose connections go only to addresses ``policy`` allows
    (built on ``http_base``/``https_base``, urllib3's connection classes by default)."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    http_conn = type(
        "CheckedHTTPConnection", (_Checked, http_base or HTTPConnection), {"policy": policy}
    )
    https_conn = type(
        "CheckedHTTPSConnection", (_Checked, https_base or HTTPSConnection), {"policy": policy}
    )
    m = urllib3.PoolManager(**kw)
    m.pool_classes_by_scheme = {
        "http": type("CheckedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("CheckedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    return m
