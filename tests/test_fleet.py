"""README "Fleets": a pull-through cache as a registry mirror, a forward proxy (Debian's tinyproxy),
a private CA, all with real peers on 127.0.0.1 (tests/peers/fleet.py).

Mirror fallback on a broken or unreachable mirror, the ``?ns=`` parameter and credentials never
going to a mirror are in tests/test_oci.py; HF_ENDPOINT and HF_TOKEN only going to it in
tests/test_hf.py and tests/test_security.py.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import require_binary, require_module
from peers.fakehub import GOOD_TOKEN

from nekko_sm import config as cfg
from nekko_sm.api import make_server
from nekko_sm.errors import NekkoError, UpstreamError, UpstreamUnavailable
from nekko_sm.pools import NoProxy
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

ROOT = Path(__file__).resolve().parent.parent
PROXY_USER, PROXY_PASSWORD = "fleet", "pr0xy-s3cret"  # tinyproxy: [A-Za-z0-9_.-] only


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# peers (module-scoped: started once for this file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require_module("cryptography")
    from peers.fleet import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory, pki):
    require_binary("nginx", "nginx-light")
    from peers.fleet import start_tls_nginx

    peer = start_tls_nginx(tmp_path_factory.mktemp("tls-nginx"), pki)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def front(pki, tproxy_module):
    """An HTTPS forward proxy: TLS with the private CA's certificate, tinyproxy behind it."""
    from peers.fleet import TlsFront

    f = TlsFront(("127.0.0.1", tproxy_module.port), pki)
    yield f
    f.close()


def _tinyproxy(tmp_path_factory, name: str, **options):
    """The body of a module fixture: a tinyproxy in its own directory, stopped afterwards."""
    require_binary("tinyproxy")
    from peers.fleet import start_tinyproxy

    with start_tinyproxy(tmp_path_factory.mktemp(name), **options) as peer:
        yield peer


@pytest.fixture(scope="module")
def tproxy_module(tmp_path_factory, tls):
    yield from _tinyproxy(tmp_path_factory, "tinyproxy", connect_ports=[tls.port])


@pytest.fixture
def tproxy(tproxy_module):
    """tinyproxy, open to 127.0.0.1; CONNECT only to the TLS nginx's port."""
    tproxy_module.clear()
    return tproxy_module


@pytest.fixture(scope="module")
def aproxy_module(tmp_path_factory):
    yield from _tinyproxy(tmp_path_factory, "tinyproxy-auth", auth=(PROXY_USER, PROXY_PASSWORD))


@pytest.fixture
def aproxy(aproxy_module):
    """tinyproxy with BasicAuth PROXY_USER:PROXY_PASSWORD."""
    aproxy_module.clear()
    return aproxy_module


@pytest.fixture
def mirror(registry, seeded, tmp_path):
    """A fresh docker-registry as a pull-through cache of ``registry`` (its counting proxy)."""
    from peers.fleet import start_pull_through

    with start_pull_through(str(tmp_path / "pull-through"), f"http://{registry.host}") as peer:
        yield peer


@pytest.fixture
def make(new_service, tmp_path):
    """make(flags=None, env=None) -> a Service on its own cache (closed after the test)."""
    caches = itertools.count()

    def make(flags: dict | None = None, env: dict | None = None, **transfer_kw) -> Service:
        transfer_kw.setdefault("backoff", 0.05)
        return new_service(
            {"cache_dir": str(tmp_path / f"cache{next(caches)}"), **(flags or {})},
            env,
            {"read_timeout": 10, **transfer_kw},
        )

    return make


@pytest.fixture
def all_logs(caplog):
    """Every nekko_sm record, down to the wire level (3)."""
    caplog.set_level(1, logger="nekko_sm")
    return caplog


def put(nginx, name: str, size: int = 4096) -> tuple[str, bytes]:
    data = hashlib.sha256(name.encode()).digest() * (size // 32)
    return nginx.put(name, data), data


def pulled(svc: Service, url: str) -> bytes:
    entry, _ = svc.pull(url)
    return Path(entry["path"]).read_bytes()


# --------------------------------------------------------------------------------------------
# 1. a pull-through cache as a registry mirror


def _wait_stored(peer, digests: set, timeout: float = 15.0) -> None:
    """distribution 2.8 stores what it pulled through in the background: wait for it."""

    def path(d: str) -> str:
        algo, hexd = d.split(":", 1)
        return os.path.join(
            peer.storage_dir, "docker", "registry", "v2", "blobs", algo, hexd[:2], hexd, "data"
        )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(os.path.exists(path(d)) for d in digests):
            return
        time.sleep(0.05)
    raise AssertionError(f"the pull-through cache did not store {digests}")


_BLOB_LINE = re.compile(
    r'msg="response completed".*http\.request\.method=GET'
    r'.*http\.request\.uri="/v2/[^"]*/blobs/(sha256:[0-9a-f]{64})'
    r".*http\.request\.useragent=(\S*)"
)


def _blob_clients(peer, mark: int, digests: set, timeout: float = 5.0) -> dict:
    """{digest: {user agents}} of the blob GETs ``peer``'s registry logged after ``mark``."""
    deadline = time.monotonic() + timeout
    while True:
        seen: dict = {}
        for m in _BLOB_LINE.finditer(peer.log_since(mark)):
            seen.setdefault(m.group(1), set()).add(m.group(2))
        if set(seen) >= digests or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_pull_through_cache_serves_the_fleet(make, reg, seeded, mirror):
    mark = reg.log_size()
    refs = ("public/single:v1", "public/multi:v1")
    flags = {
        "insecure_registry": [reg.host],
        "platform": "linux/amd64",
        "registry_mirror": [f"{reg.host}=http://{mirror.host}"],
    }
    wanted = {
        ref: seeded[ref].for_platform("linux/amd64") if seeded[ref].platforms else seeded[ref]
        for ref in refs
    }
    blobs = set().union(*(w.blob_digests() for w in wanted.values()))

    first = make(flags)
    for ref in refs:
        assert first.pull(seeded[ref].url)[0]["digest"] == seeded[ref].digest
    assert all(first.store.verify_blob(d) for d in blobs)
    # nekko-sm asked the mirror only; the mirror fetched every blob from the registry
    assert mirror.blob_gets() == len(blobs)
    assert {r.blob_digest for r in mirror.requests if r.blob_digest} == blobs
    assert all(r.status == 200 for r in mirror.requests)
    assert all("?ns=" in r.path for r in mirror.requests)
    assert {r.blob_digest for r in reg.requests if r.blob_digest and r.method == "GET"} == blobs
    clients = _blob_clients(reg, mark, blobs)
    assert set(clients) == blobs
    assert all("nekko-sm" not in agents for agents in clients.values()), clients  # the mirror's

    # a second node, through the same mirror: the registry sends no blob again
    _wait_stored(mirror, blobs)
    reg.clear()
    mirror.clear()
    second = make(flags)
    for ref in refs:
        assert second.pull(seeded[ref].url)[0]["digest"] == seeded[ref].digest
    assert {r.blob_digest for r in mirror.requests if r.blob_digest} == blobs
    assert reg.blob_gets() == 0, reg.requests
    assert set(second.store.blobs()) == set(first.store.blobs())


def test_pull_through_cache_failing_blobs_fall_back_to_the_registry(
    make, reg, seeded, mirror, caplog
):
    """The mirror serves the manifest, then fails the blobs: they come from the registry."""
    caplog.set_level(logging.INFO, logger="nekko_sm.oci")
    info = seeded["public/docker:v1"]
    with mirror.configured(fail_with=500, fail_match="/blobs/"):
        svc = make(
            {
                "insecure_registry": [reg.host],
                "platform": "linux/amd64",
                "registry_mirror": [f"{reg.host}=http://{mirror.host}"],
            }
        )
        entry, _ = svc.pull(info.url)
        failed = [r for r in mirror.requests if r.blob_digest]
        assert mirror.manifest_gets() >= 1 and failed and all(r.status == 500 for r in failed)
    assert entry["digest"] == info.digest
    direct = [r for r in reg.requests if r.blob_digest and "?ns=" not in r.path]
    assert {r.blob_digest for r in direct} == info.blob_digests()
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 1  # said once


def test_pull_through_cache_whose_upstream_fails_falls_back(make, reg, seeded, tmp_path_factory):
    """A real pull-through cache whose own upstream breaks answers with an error of its own
    making: the registry itself is asked, at once (distribution refuses to start with an
    upstream it cannot reach, so this one breaks after the start)."""
    from peers.fleet import start_pull_through

    upstream = reg.new_proxy()  # the cache's way to the registry, broken below
    with start_pull_through(
        str(tmp_path_factory.mktemp("broken-pull-through")), upstream.url
    ) as broken:
        upstream.fail_with = 503
        svc = make(
            {
                "insecure_registry": [reg.host],
                "platform": "linux/amd64",
                "registry_mirror": [f"{reg.host}=http://{broken.host}"],
            }
        )
        info = seeded["public/single:v1"]
        started = time.monotonic()
        assert svc.pull(info.url)[0]["digest"] == info.digest
        assert time.monotonic() - started < 10
        assert upstream.requests and broken.requests
        assert any(r.status >= 400 for r in broken.requests)
        assert not any(r.blob_digest and r.status == 200 for r in broken.requests)
    assert reg.blob_gets() == len(info.blob_digests())


@pytest.mark.parametrize("insecure", [True, False])
def test_plain_http_mirror_named_without_scheme(make, reg, seeded, mirror, insecure):
    """``--registry-mirror R=HOST:PORT`` is https unless HOST:PORT is an --insecure-registry
    (README: "A mirror without TLS also needs --insecure-registry")."""
    info = seeded["public/single:v1"]
    hosts = [reg.host] + ([mirror.host] if insecure else [])
    svc = make(
        {
            "insecure_registry": hosts,
            "platform": "linux/amd64",
            "registry_mirror": [f"{reg.host}={mirror.host}"],
        }
    )
    assert svc.pull(info.url)[0]["digest"] == info.digest
    if insecure:
        assert mirror.blob_gets() == len(info.blob_digests())
        assert all(r.status == 200 for r in mirror.requests)
    else:  # https to a plain-http mirror fails: the registry itself is asked
        assert mirror.requests == []
        assert reg.blob_gets() == len(info.blob_digests())


# --------------------------------------------------------------------------------------------
# 2. a forward proxy


def test_http_pull_goes_through_http_proxy(make, nginx, tproxy):
    url, data = put(nginx, "fleet-via-proxy.bin")
    svc = make(env={"HTTP_PROXY": tproxy.url})
    assert pulled(svc, url) == data
    assert tproxy.requests() and all(
        r.method == "GET" and r.target == url for r in tproxy.requests()
    )
    assert nginx.requests_for("fleet-via-proxy.bin")


def test_lower_case_http_proxy_works_too(make, nginx, tproxy):
    url, data = put(nginx, "fleet-lower-proxy.bin")
    assert pulled(make(env={"http_proxy": tproxy.url}), url) == data
    assert url in tproxy.targets()


@pytest.mark.parametrize(
    "no_proxy",
    [
        "127.0.0.1",
        "*",
        "{host}",
        "localhost, 127.0.0.1",
        ".example,127.0.0.1",
        "EXAMPLE.COM,127.0.0.1",
    ],
)
def test_no_proxy_reaches_the_host_directly(make, nginx, tproxy, no_proxy):
    url, data = put(nginx, "fleet-no-proxy.bin")
    host = url.split("/")[2]
    for name in ("NO_PROXY", "no_proxy"):
        tproxy.clear()
        svc = make(env={"HTTP_PROXY": tproxy.url, name: no_proxy.format(host=host)})
        assert pulled(svc, url) == data
        assert tproxy.requests() == []


@pytest.mark.parametrize(
    "no_proxy", [".example", "example.com", "27.0.0.1", "127.0.0.1:1", "localhost"]
)
def test_no_proxy_that_does_not_match_still_proxies(make, nginx, tproxy, no_proxy):
    url, data = put(nginx, "fleet-no-proxy-miss.bin")
    svc = make(env={"HTTP_PROXY": tproxy.url, "NO_PROXY": no_proxy})
    assert pulled(svc, url) == data
    assert tproxy.targets() == [url]


@pytest.mark.parametrize(
    "entry,url,bypass",
    [
        (".example", "http://mirror.example:5000/x", True),
        (".example", "http://a.b.example/x", True),
        (".example", "http://example/x", True),
        (".example", "http://notexample/x", False),
        ("*.example", "https://a.example/x", True),
        ("example", "https://a.example/x", True),
        ("mirror.internal:5000", "http://mirror.internal:5000/v2/", True),
        ("mirror.internal:5000", "https://mirror.internal/v2/", False),
        ("mirror.internal:443", "https://mirror.internal/v2/", True),
        ("::1", "http://[::1]:8080/x", True),
        ("[::1]", "http://[::1]:8080/x", True),
        ("[::1]:8080", "http://[::1]:8080/x", True),
        ("[::1]:8081", "http://[::1]:8080/x", False),
        ("*", "http://anything/x", True),
        ("", "http://anything/x", False),
    ],
)
def test_no_proxy_rules(entry, url, bypass):
    assert NoProxy(entry).bypass(url) is bypass


def test_each_scheme_has_its_own_proxy(make, nginx, tls, pki, tproxy):
    """HTTPS_PROXY is for https URLs, HTTP_PROXY for http ones."""
    url, data = put(nginx, "fleet-scheme.bin")
    surl = tls.put("fleet-scheme.bin", data)
    svc = make({"ca_cert": str(pki.ca_path)}, {"HTTPS_PROXY": tproxy.url})
    assert pulled(svc, url) == data
    assert tproxy.requests() == []
    assert pulled(svc, surl) == data
    assert [(r.method, r.target) for r in tproxy.requests()] == [
        ("CONNECT", f"127.0.0.1:{tls.port}")
    ]
    tproxy.clear()
    svc = make({"ca_cert": str(pki.ca_path)}, {"HTTP_PROXY": tproxy.url})
    assert pulled(svc, surl) == data
    assert tproxy.requests() == []


def test_oci_pull_through_the_proxy(make, reg, seeded, tproxy):
    info = seeded["public/multi:v1"]
    svc = make(
        {"insecure_registry": [reg.host], "platform": "linux/arm64"}, {"HTTP_PROXY": tproxy.url}
    )
    assert svc.pull(info.url)[0]["digest"] == info.digest
    targets = tproxy.targets()
    blobs = {t.rsplit("/", 1)[1] for t in targets if "/blobs/" in t}
    assert blobs == info.for_platform("linux/arm64").blob_digests()
    assert all(t.startswith(f"http://{reg.host}/v2/") for t in targets)
    assert reg.blob_gets() == len(blobs)


def test_hf_pull_through_the_proxy_with_the_cdn_redirect(make, fakehub, tproxy):
    """The Hub and its CDN (``localhost``, another host) both through the proxy; HF_TOKEN goes
    to the Hub only (the fake CDN refuses any Authorization)."""
    data = hashlib.sha256(b"fleet").digest() * 2048
    fakehub.add_repo(
        "fleet/private-model", files={"model.gguf": data, "config.json": b"{}"}, private=True
    )
    fakehub.clear_log()
    svc = make(
        env={"HF_ENDPOINT": fakehub.endpoint, "HF_TOKEN": GOOD_TOKEN, "HTTP_PROXY": tproxy.url}
    )
    assert pulled(svc, "hf:///fleet/private-model/model.gguf") == data
    entry, _ = svc.pull("hf:///fleet/private-model")
    assert entry["state"] == "complete"
    targets = tproxy.targets()
    assert any(t.startswith(fakehub.endpoint + "/") for t in targets)
    assert any(t.startswith(fakehub.cdn_endpoint + "/") for t in targets)
    hub, cdn = fakehub.log("hub"), fakehub.log("cdn")
    assert hub and all(r.has_authorization for r in hub)
    assert cdn and not any(r.has_authorization for r in cdn)


def test_proxy_credentials_are_sent_and_never_shown(make, nginx, tls, pki, aproxy, all_logs):
    url, data = put(nginx, "fleet-auth-proxy.bin")
    surl = tls.put("fleet-auth-proxy.bin", data)
    svc = make(
        {"ca_cert": str(pki.ca_path)},
        {"HTTP_PROXY": aproxy.auth_url, "HTTPS_PROXY": aproxy.auth_url},
    )
    assert pulled(svc, url) == data
    assert pulled(svc, surl) == data
    assert [r.method for r in aproxy.requests()] == ["GET", "CONNECT"]
    # without credentials: the proxy's 407 is said as such, and not retried
    aproxy.clear()
    errors = []
    for u in (url, surl):
        svc = make(
            {"ca_cert": str(pki.ca_path)}, {"HTTP_PROXY": aproxy.url, "HTTPS_PROXY": aproxy.url}
        )
        with pytest.raises(UpstreamError) as e:
            svc.pull(u)
        assert not isinstance(e.value, UpstreamUnavailable)
        assert "407" in e.value.message and "proxy" in e.value.message
        errors.append(e.value.message)
    assert len(aproxy.requests()) == 2
    # with a wrong password (tinyproxy answers 401 then): it fails, and says no password
    bad = aproxy.auth_url.replace(PROXY_PASSWORD, "wr0ng-pw")
    for u in (url, surl):
        svc = make({"ca_cert": str(pki.ca_path)}, {"HTTP_PROXY": bad, "HTTPS_PROXY": bad})
        with pytest.raises(NekkoError) as e:
            svc.pull(u)
        errors.append(e.value.message)
    text = "\n".join(errors + [r.getMessage() for r in all_logs.records])
    assert PROXY_PASSWORD not in text and "wr0ng-pw" not in text
    assert f"{PROXY_USER}:" not in text


def test_proxy_credentials_are_percent_decoded(tmp_path):
    config = cfg.build(
        {"cache_dir": str(tmp_path)},
        {"HTTPS_PROXY": "http://us%40er:p%40ss%3Aw%2Frd@127.0.0.1:3128"},
    )
    t = Transfer(config)
    try:
        m = t._manager("https://example.org/x")
        want = "Basic " + base64.b64encode(b"us@er:p@ss:w/rd").decode()
        assert m.proxy_headers.get("proxy-authorization") == want
        assert m.proxy.host == "127.0.0.1" and m.proxy.port == 3128 and m.proxy.auth is None
    finally:
        t.close()


def test_cli_with_proxy_credentials_logs_no_password(nginx, aproxy, tmp_path):
    url, data = put(nginx, "fleet-cli-proxy.bin")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HTTP_PROXY=aproxy.auth_url)
    argv = [sys.executable, "-m", "nekko_sm", "--cache-dir", str(tmp_path / "c"), "-v=3"]
    ok = subprocess.run(
        argv + ["pull", "--json", url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["digest"] == sha(data)
    env["HTTP_PROXY"] = aproxy.url  # no credentials: 407
    no = subprocess.run(
        argv + ["pull", url + "?again"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert no.returncode == 1 and "407" in no.stderr
    for out in (ok.stdout + ok.stderr, no.stdout + no.stderr):
        assert PROXY_PASSWORD not in out
        assert base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode() not in out


def test_tunnel_refused_by_the_proxy_is_final(make, pki, tproxy, front):
    """tinyproxy allows CONNECT to the TLS nginx's port only: another port is a 403, said
    once, not retried."""
    svc = make({"ca_cert": str(pki.ca_path)}, {"HTTPS_PROXY": tproxy.url})
    with pytest.raises(UpstreamError) as e:
        svc.pull(f"{front.url}/files/x")
    assert not isinstance(e.value, UpstreamUnavailable)
    assert "refused the tunnel (403" in e.value.message
    assert len(tproxy.requests()) == 1


# --------------------------------------------------------------------------------------------
# 3. a private CA


def _post(server, body: dict) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request(
            "POST",
            "/content/",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_untrusted_certificate_is_a_clear_final_error(tmp_path, tls):
    url = tls.put("fleet-untrusted.bin", b"x" * 1000)
    config = cfg.build({"cache_dir": str(tmp_path / "cache"), "address": "127.0.0.1:0"}, {})
    transfer = Transfer(config, backoff=0.2)
    waits: list = []
    transfer._sleep = lambda *a, **k: waits.append(a)  # type: ignore[method-assign]
    svc = Service(config, transfer=transfer)
    server = make_server(svc, config.address)
    import threading

    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        status, doc = _post(server, {"url": url})
        assert waits == []  # final at once: not retried (no wait before another try)
    finally:
        server.shutdown()
        server.server_close()
        svc.close()
    assert status == 502 and doc["error"]["code"] == "upstream-error", doc
    message = doc["error"]["message"]
    assert "certificate" in message and "--ca-cert" in message, message
    assert not [u for u in tls.uris() if "fleet-untrusted" in u]  # no request got through


@pytest.mark.parametrize("how", ["flag", "SSL_CERT_FILE"])
def test_private_ca_is_trusted(make, tls, pki, how):
    url = tls.put(f"fleet-ca-{how}.bin", b"trusted " * 500)
    flags, env = (
        ({"ca_cert": str(pki.ca_path)}, {})
        if how == "flag"
        else ({}, {"SSL_CERT_FILE": str(pki.ca_path)})
    )
    assert pulled(make(flags, env), url) == b"trusted " * 500


def test_another_ca_is_not_enough(make, tls, pki):
    url = tls.put("fleet-other-ca.bin", b"y" * 100)
    svc = make({"ca_cert": str(pki.other_ca_path)})
    with pytest.raises(UpstreamError) as e:
        svc.pull(url)
    assert e.value.code == "upstream-error" and "certificate" in e.value.message


def test_https_to_http_redirect_is_refused(make, tls, pki):
    """Issue 9, finding 9: a redirect from https to plain http is a downgrade (as apt says)."""
    svc = make({"ca_cert": str(pki.ca_path)})
    with pytest.raises(UpstreamError, match="from https to plain http"):
        svc.pull(tls.url + "/downgrade")
    assert svc.store.entries() == []


def test_https_through_the_proxy_with_the_private_ca(make, tls, pki, tproxy):
    url = tls.put("fleet-connect.bin", b"z" * 5000)
    svc = make({"ca_cert": str(pki.ca_path)}, {"HTTPS_PROXY": tproxy.url})
    assert pulled(svc, url) == b"z" * 5000
    assert [(r.method, r.target) for r in tproxy.requests()] == [
        ("CONNECT", f"127.0.0.1:{tls.port}")
    ]
    # the tunnel does not make the certificate trusted
    tproxy.clear()
    svc = make(env={"HTTPS_PROXY": tproxy.url})
    with pytest.raises(UpstreamError) as e:
        svc.pull(tls.put("fleet-connect-2.bin", b"w"))
    assert "certificate" in e.value.message and f"127.0.0.1:{tls.port}" in e.value.message


def test_https_proxy_with_the_private_ca(make, nginx, tls, pki, tproxy, front):
    """An https:// proxy (TLS to the proxy itself) whose certificate only the CA vouches for."""
    url, data = put(nginx, "fleet-https-proxy.bin")
    surl = tls.put("fleet-https-proxy.bin", data)
    before = front.connections
    svc = make({"ca_cert": str(pki.ca_path)}, {"HTTP_PROXY": front.url, "HTTPS_PROXY": front.url})
    assert pulled(svc, url) == data
    assert pulled(svc, surl) == data  # TLS to the target inside TLS to the proxy
    assert front.connections > before
    assert [r.method for r in tproxy.requests()] == ["GET", "CONNECT"]
    svc = make(env={"HTTP_PROXY": front.url})
    with pytest.raises(UpstreamError) as e:
        svc.pull(url + "?untrusted-proxy")
    assert "certificate of the proxy" in e.value.message


def test_registry_over_https_with_the_private_ca(make, reg, seeded, pki):
    """A registry (or mirror) with TLS from the private CA: no --insecure-registry needed."""
    from peers.fleet import TlsFront

    info = seeded["public/single:v1"]
    with TlsFront(("127.0.0.1", reg.port), pki) as tls_reg:
        url = info.url.replace(reg.host, f"127.0.0.1:{tls_reg.port}")
        svc = make({"ca_cert": str(pki.ca_path), "platform": "linux/amd64"})
        assert svc.pull(url)[0]["digest"] == info.digest
        assert reg.blob_gets() == len(info.blob_digests())
        # and as a mirror of the plain-http registry
        svc = make(
            {
                "ca_cert": str(pki.ca_path),
                "platform": "linux/amd64",
                "insecure_registry": [reg.host],
                "registry_mirror": [f"{reg.host}=https://127.0.0.1:{tls_reg.port}"],
            }
        )
        reg.clear()
        assert svc.pull(info.url)[0]["digest"] == info.digest
        assert reg.requests and all("?ns=" in r.path for r in reg.requests)
