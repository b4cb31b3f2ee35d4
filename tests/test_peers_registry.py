"""Tests of the registry peers themselves (docker-registry, the counting proxy, the redirect
blob host, the token server, the seeded images) -- with urllib3/http.client, not nekko_sm."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import urllib3
from peers import require_binary
from peers.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    EMPTY_JSON_DIGEST,
    MANIFEST_ACCEPT,
    MODEL_ARTIFACT_TYPE,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    push_image,
)
from peers.tokenserver import (
    ALICE_TOKEN,
    CREDENTIALS,
    ISSUER,
    SERVICE,
    decode_jwt_unverified,
    fetch_token,
    parse_challenge,
)

if TYPE_CHECKING:
    from peers.registry import RegistryPeer

# The fixtures registry, auth_registry, seeded, auth_seeded, reg, areg come from
# tests/conftest.py's pytest_plugins (importing peers.registry at the top of a test module would defeat pytest's
# assertion rewriting of it, which filterwarnings=error turns into a collection error).


@pytest.fixture
def web() -> Iterator[urllib3.PoolManager]:
    # no retries, but redirects are followed (urllib3 drops Authorization across hosts)
    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=3)
    pm = urllib3.PoolManager(retries=retries, timeout=30)
    try:
        yield pm
    finally:
        pm.clear()


def token_for(peer: RegistryPeer, scope: str, creds: tuple[str, str] | None = None) -> str | None:
    assert peer.token_server is not None
    return fetch_token(peer.token_server.realm, SERVICE, [scope], creds)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the anonymous registry ------------------------------------------------------------------


def test_anonymous_v2_answers_200_and_is_counted(reg: RegistryPeer, web) -> None:
    r = web.request("GET", f"{reg.url}/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert reg.requests[-1].method == "GET" and reg.requests[-1].path == "/v2/"
    assert reg.requests[-1].status == 200 and not reg.requests[-1].has_authorization


def test_proxy_keeps_connections_alive(reg: RegistryPeer) -> None:
    with urllib3.HTTPConnectionPool("127.0.0.1", reg.port, maxsize=1, retries=False) as pool:
        for _ in range(5):
            assert pool.request("GET", "/v2/").status == 200
        assert pool.num_connections == 1
    assert len(reg.requests) == 5


def test_seeded_manifests_are_served_with_the_right_accept(reg: RegistryPeer, seeded, web):
    assert set(seeded) == {
        "public/single:v1",
        "public/multi:v1",
        "public/docker:v1",
        "public/share-a:v1",
        "public/share-b:v1",
        "public/model:v1",
    }
    for ref, info in seeded.items():
        r = web.request(
            "GET",
            f"{reg.url}/v2/{info.repo}/manifests/{info.tag}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert r.status == 200, ref
        assert r.data == info.manifest
        assert sha256(r.data) == info.digest == r.headers["Docker-Content-Digest"]
        assert r.headers["Content-Type"] == info.media_type
        by_digest = web.request(
            "GET",
            f"{reg.url}/v2/{info.repo}/manifests/{info.digest}",
            headers={"Accept": info.media_type},
        )
        assert by_digest.status == 200 and by_digest.data == info.manifest
    assert reg.manifest_gets() == 2 * len(seeded)


def test_single_image_descriptors(seeded) -> None:
    info = seeded["public/single:v1"]
    assert info.media_type == OCI_MANIFEST and info.index_digest is None
    assert info.manifest_digest == info.digest
    assert len(info.layers) == 3 and info.layer_sizes[1] > 200_000
    assert info.url == f"oci://{info.host}/public/single:v1"
    doc = json.loads(info.manifest)
    assert doc["config"]["digest"] == info.config_digest
    assert [d["digest"] for d in doc["layers"]] == info.layer_digests


def test_multi_arch_index_with_attestations(reg: RegistryPeer, seeded, web) -> None:
    info = seeded["public/multi:v1"]
    assert info.media_type == OCI_INDEX and info.index_digest == info.digest
    assert set(info.platforms) == {"linux/amd64", "linux/arm64", "linux/arm/v7"}
    assert len(info.attestations) == 3
    doc = json.loads(info.manifest)
    unknown = [d for d in doc["manifests"] if d["platform"]["os"] == "unknown"]
    assert len(unknown) == 3
    assert all(
        d["annotations"]["vnd.docker.reference.type"] == "attestation-manifest" for d in unknown
    )
    amd64 = info.platforms["linux/amd64"]
    assert {d["annotations"]["vnd.docker.reference.digest"] for d in unknown} == {
        p.digest for p in info.platforms.values()
    }
    assert len({p.digest for p in info.platforms.values()}) == 3
    assert amd64.media_type == OCI_MANIFEST and amd64.index_digest == info.digest
    # distribution 2.8 will not serve an OCI index to a client that does not accept one
    r = web.request(
        "GET", f"{reg.url}/v2/public/multi/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert r.status == 404


def test_docker_schema2_image(seeded) -> None:
    info = seeded["public/docker:v1"]
    assert info.media_type == DOCKER_MANIFEST
    assert info.config_media_type == DOCKER_CONFIG
    assert {d["mediaType"] for d in info.layers} == {DOCKER_LAYER_GZIP}


def test_shared_layers(seeded) -> None:
    a, b = seeded["public/share-a:v1"], seeded["public/share-b:v1"]
    assert a.layer_digests[:2] == b.layer_digests[:2]
    assert a.layer_digests[2] != b.layer_digests[2]
    assert a.config_digest != b.config_digest


def test_model_artifact(seeded, reg: RegistryPeer) -> None:
    info = seeded["public/model:v1"]
    doc = json.loads(info.manifest)
    assert doc["artifactType"] == info.artifact_type == MODEL_ARTIFACT_TYPE
    assert info.config_media_type == OCI_EMPTY and info.config_digest == EMPTY_JSON_DIGEST
    assert set(info.files) == {"model.gguf", "tokenizer/tokenizer.json", "config.json"}
    with open(reg.blob_file(info.files["model.gguf"]["digest"]), "rb") as f:
        assert f.read(4) == b"GGUF"


def test_proxy_counts_blob_gets_and_ranges(reg: RegistryPeer, seeded, web) -> None:
    info = seeded["public/single:v1"]
    digest, size = info.layer_digests[1], info.layer_sizes[1]
    url = f"{reg.url}/v2/public/single/blobs/{digest}"
    r = web.request("GET", url)
    assert r.status == 200 and sha256(r.data) == digest and len(r.data) == size
    r2 = web.request("GET", url, headers={"Range": "bytes=100-"})
    assert r2.status == 206 and r2.data == r.data[100:]
    assert web.request("HEAD", url).status == 200
    assert reg.blob_gets(digest) == 2 and reg.blob_gets() == 2
    assert reg.blob_gets(info.layer_digests[0]) == 0
    last = reg.requests[-2]
    assert (last.range, last.status, last.bytes) == ("bytes=100-", 206, size - 100)
    assert reg.requests[0].bytes == size
    reg.clear()
    assert reg.blob_gets() == 0 and reg.requests == []


def test_redirect_to_second_host_that_rejects_authorization(reg: RegistryPeer, seeded, web):
    info = seeded["public/single:v1"]
    digest = info.layer_digests[1]
    with reg.configured(redirect_blobs=True):
        r = web.request("GET", f"{reg.url}/v2/public/single/blobs/{digest}", redirect=False)
        assert r.status == 307
        location = r.headers["Location"]
        assert location.startswith(f"http://{reg.blob_host}/") and "localhost:" in location
        assert reg.blob_gets(digest) == 1
        bad = web.request("GET", location, headers={"Authorization": "Bearer xyz"})
        assert bad.status == 400 and b"InvalidArgument" in bad.data
        good = web.request("GET", location)
        assert good.status == 200 and sha256(good.data) == digest
        part = web.request("GET", location, headers={"Range": "bytes=10-19"})
        assert part.status == 206 and part.data == good.data[10:20]
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(good.data)}"
        stale = web.request("GET", location, headers={"Range": "bytes=10-", "If-Range": '"other"'})
        assert stale.status == 200 and len(stale.data) == len(good.data)
        tampered = web.request("GET", location.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
        assert tampered.status == 403
        # HEAD and manifests are not redirected
        assert web.request("HEAD", f"{reg.url}/v2/public/single/blobs/{digest}").status == 200
        hosts = [(q.status, q.has_authorization) for q in reg.blob_host_requests]
        assert hosts == [(400, True), (200, False), (206, False), (200, False), (403, False)]
        # a client that follows redirects and drops Authorization gets the blob
        followed = web.request("GET", f"{reg.url}/v2/public/single/blobs/{digest}")
        assert followed.status == 200 and sha256(followed.data) == digest
    assert reg.redirect_blobs is False


def test_drop_connection_once_then_resume(reg: RegistryPeer, seeded) -> None:
    info = seeded["public/single:v1"]
    digest, size = info.layer_digests[1], info.layer_sizes[1]
    path = f"/v2/public/single/blobs/{digest}"
    reg.drop_blob_once(digest, 70_000)
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and int(r.headers["Content-Length"]) == size
        with pytest.raises(http.client.IncompleteRead) as e:
            r.read()
        got = e.value.partial
    finally:
        conn.close()
    assert len(got) == 70_000
    with urllib3.HTTPConnectionPool("127.0.0.1", reg.port, retries=False) as pool:
        rest = pool.request("GET", path, headers={"Range": f"bytes={len(got)}-"})
        assert rest.status == 206
        assert sha256(got + rest.data) == digest
        again = pool.request("GET", path)  # once only
        assert again.status == 200 and len(again.data) == size
    assert [q.bytes for q in reg.requests] == [70_000, size - 70_000, size]


def test_drop_on_the_redirect_host(reg: RegistryPeer, seeded, web) -> None:
    info = seeded["public/single:v1"]
    digest, size = info.layer_digests[1], info.layer_sizes[1]
    with reg.configured(redirect_blobs=True):
        reg.drop_blob_once(digest, 1000)
        r = web.request("GET", f"{reg.url}/v2/public/single/blobs/{digest}", preload_content=False)
        assert r.status == 200 and r.headers["Content-Length"] == str(size)
        with pytest.raises(urllib3.exceptions.HTTPError):
            r.read()
        r.release_conn()
        assert reg.blob_host_requests[-1].bytes == 1000
        ok = web.request("GET", f"{reg.url}/v2/public/single/blobs/{digest}")
        assert len(ok.data) == size


def test_fail_with_then_recover(reg: RegistryPeer, seeded, web) -> None:
    with reg.configured(fail_with=503, fail_times=2, retry_after=1, fail_match="/manifests/"):
        url = f"{reg.url}/v2/public/single/manifests/v1"
        assert web.request("GET", f"{reg.url}/v2/").status == 200  # not matched
        r = web.request("GET", url, headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert web.request("GET", url, headers={"Accept": MANIFEST_ACCEPT}).status == 503
        assert web.request("GET", url, headers={"Accept": MANIFEST_ACCEPT}).status == 200
        assert [q.status for q in reg.requests] == [200, 503, 503, 200]


def test_broken_mirror_is_a_separate_proxy(reg: RegistryPeer, seeded, web) -> None:
    mirror = reg.new_proxy(fail_with=500)
    assert mirror.host != reg.host
    digest = seeded["public/single:v1"].layer_digests[0]
    assert web.request("GET", f"{mirror.url}/v2/public/single/blobs/{digest}").status == 500
    mirror.fail_with = None
    assert web.request("GET", f"{mirror.url}/v2/public/single/blobs/{digest}").status == 200
    assert mirror.blob_gets(digest) == 2 and reg.blob_gets(digest) == 0


def test_push_through_the_proxy(reg: RegistryPeer, tmp_path) -> None:
    info = push_image(
        reg,
        "public/pushed:v1",
        [1000, 150_000],
        seed="push-test",
        workdir=str(tmp_path),
        via_proxy=True,
    )
    methods = {q.method for q in reg.requests}
    assert {"POST", "PUT"} <= methods
    assert all(q.status < 500 for q in reg.requests)
    assert info.layer_sizes[1] > 150_000 and info.layout is not None
    again = push_image(
        reg, "public/pushed:v2", [1000, 150_000], seed="push-test", workdir=str(tmp_path)
    )
    assert again.digest == info.digest  # deterministic


# -- the token-auth registry -------------------------------------------------------------------


def test_auth_registry_challenge(areg: RegistryPeer, web) -> None:
    assert areg.token_server is not None
    r = web.request("GET", f"{areg.url}/v2/")
    assert r.status == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params["realm"] == areg.token_server.realm
    assert params["service"] == SERVICE


def test_anonymous_token_pulls_public_not_private(areg: RegistryPeer, auth_seeded, web):
    assert set(auth_seeded) == {"public/single:v1", "private/single:v1"}
    pub = token_for(areg, "repository:public/single:pull")
    assert pub
    header, claims = decode_jwt_unverified(pub)
    assert header["alg"] == "RS256" and header["x5c"]
    assert claims["iss"] == ISSUER and claims["aud"] == SERVICE and claims["sub"] == ""
    assert claims["access"] == [
        {"type": "repository", "name": "public/single", "actions": ["pull"]}
    ]
    r = web.request(
        "GET",
        f"{areg.url}/v2/public/single/manifests/v1",
        headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {pub}"},
    )
    assert r.status == 200 and r.data == auth_seeded["public/single:v1"].manifest

    priv = token_for(areg, "repository:private/single:pull")
    assert priv and decode_jwt_unverified(priv)[1]["access"] == []
    r = web.request(
        "GET",
        f"{areg.url}/v2/private/single/manifests/v1",
        headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {priv}"},
    )
    assert r.status == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # the public token is no good for the private repository either
    r = web.request(
        "GET",
        f"{areg.url}/v2/private/single/manifests/v1",
        headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {pub}"},
    )
    assert r.status == 401
    # anonymous push is not granted
    push = token_for(areg, "repository:public/single:pull,push")
    assert push and decode_jwt_unverified(push)[1]["access"][0]["actions"] == ["pull"]


def test_basic_credentials_pull_private(areg: RegistryPeer, auth_seeded, web) -> None:
    ts = areg.token_server
    assert ts is not None
    tok = token_for(areg, "repository:private/single:pull,push", CREDENTIALS)
    assert tok
    assert decode_jwt_unverified(tok)[1]["sub"] == "alice"
    info = auth_seeded["private/single:v1"]
    r = web.request(
        "GET",
        f"{areg.url}/v2/private/single/manifests/v1",
        headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {tok}"},
    )
    assert r.status == 200 and r.data == info.manifest
    blob = web.request(
        "GET",
        f"{areg.url}/v2/private/single/blobs/{info.layer_digests[0]}",
        headers={"Authorization": f"Bearer {tok}"},
    )
    assert blob.status == 200 and sha256(blob.data) == info.layer_digests[0]
    assert areg.requests[-1].has_authorization
    # wrong password and an unknown Bearer are refused by the token server
    assert token_for(areg, "repository:private/single:pull", ("alice", "wrong")) is None
    r = web.request(
        "GET",
        f"{ts.realm}?service={SERVICE}&scope=repository:private/single:pull",
        headers={"Authorization": "Bearer not-a-known-token"},
    )
    assert r.status == 401
    r = web.request(
        "GET",
        f"{ts.realm}?service={SERVICE}&scope=repository:private/single:pull",
        headers={"Authorization": f"Bearer {ALICE_TOKEN}"},
    )
    assert r.status == 200
    doc = json.loads(r.data)
    assert set(doc) >= {"token", "access_token", "expires_in", "issued_at"}
    assert doc["token"] == doc["access_token"]
    # records never hold a secret
    kinds = [(q.auth, q.user, q.status) for q in ts.requests]
    assert kinds == [
        ("basic", "alice", 200),
        ("basic", "", 401),
        ("bearer", "", 401),
        ("bearer", "alice", 200),
    ]
    assert ts.requests[0].scopes == ["repository:private/single:pull,push"]
    assert "s3cret" not in repr(ts.requests) and ALICE_TOKEN not in repr(ts.requests)


def test_token_post_and_repeated_scopes(areg: RegistryPeer, web) -> None:
    ts = areg.token_server
    assert ts is not None
    r = web.request(
        "GET",
        f"{ts.realm}?service={SERVICE}&scope=repository:public/a:pull"
        f"&scope=repository:private/b:pull",
    )
    access = decode_jwt_unverified(json.loads(r.data)["token"])[1]["access"]
    assert access == [{"type": "repository", "name": "public/a", "actions": ["pull"]}]
    r = web.request_encode_body(
        "POST",
        ts.realm,
        encode_multipart=False,
        fields={
            "grant_type": "password",
            "username": "alice",
            "password": "s3cret",
            "service": SERVICE,
            "scope": "repository:private/b:pull,push",
            "client_id": "nekko-test",
            "access_type": "offline",
        },
    )
    doc = json.loads(r.data)
    assert r.status == 200 and doc["refresh_token"]
    r = web.request_encode_body(
        "POST",
        ts.realm,
        encode_multipart=False,
        fields={
            "grant_type": "refresh_token",
            "refresh_token": doc["refresh_token"],
            "service": SERVICE,
            "scope": "repository:private/b:pull",
            "client_id": "nekko-test",
        },
    )
    assert r.status == 200
    assert decode_jwt_unverified(json.loads(r.data)["access_token"])[1]["sub"] == "alice"


def test_short_lived_token_really_expires(areg: RegistryPeer, auth_seeded, web) -> None:
    ts = areg.token_server
    assert ts is not None
    ts.expires_in = 1
    # JWT times are whole seconds: start just after a second begins, so the token lives ~1 s
    time.sleep(1.02 - time.time() % 1.0)
    tok = token_for(areg, "repository:public/single:pull")
    issued = int(time.time())
    assert tok and decode_jwt_unverified(tok)[1]["iat"] == issued
    url = f"{areg.url}/v2/public/single/manifests/v1"
    headers = {"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {tok}"}
    assert web.request("GET", url, headers=headers).status == 200
    time.sleep(max(0.0, issued + 1.1 - time.time()))
    r = web.request("GET", url, headers=headers)
    assert r.status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_redirect_on_auth_registry_needs_the_registry_s_authorization(areg, auth_seeded, web):
    info = auth_seeded["private/single:v1"]
    path = f"/v2/private/single/blobs/{info.layer_digests[1]}"
    with areg.configured(redirect_blobs=True):
        r = web.request("GET", areg.url + path, redirect=False)
        assert r.status == 401  # not redirected without a token
        tok = token_for(areg, "repository:private/single:pull", CREDENTIALS)
        r = web.request(
            "GET", areg.url + path, redirect=False, headers={"Authorization": f"Bearer {tok}"}
        )
        assert r.status == 307
        assert (
            web.request(
                "GET", r.headers["Location"], headers={"Authorization": f"Bearer {tok}"}
            ).status
            == 400
        )
        blob = web.request("GET", r.headers["Location"])
        assert sha256(blob.data) == info.layer_digests[1]


def test_peer_request_helper_answers_the_challenge(areg: RegistryPeer, auth_seeded) -> None:
    r = areg.request(
        "GET", "/v2/private/single/manifests/v1", {"Accept": MANIFEST_ACCEPT}, creds=CREDENTIALS
    )
    assert r.status == 200
    assert (
        areg.request("GET", "/v2/private/single/manifests/v1", {"Accept": MANIFEST_ACCEPT}).status
        == 401
    )


# -- third-party tools against the peers -------------------------------------------------------


def test_skopeo_and_umoci_read_pushed_images(reg: RegistryPeer, seeded, tmp_path) -> None:
    skopeo = require_binary("skopeo")
    umoci = require_binary("umoci")
    info = seeded["public/single:v1"]
    out = subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "inspect",
            "--tls-verify=false",
            f"docker://{reg.host}/public/single:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    doc = json.loads(out)
    assert doc["Digest"] == info.digest and doc["Layers"] == info.layer_digests
    raw = subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{reg.host}/public/multi:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    assert raw == seeded["public/multi:v1"].manifest
    layout = str(tmp_path / "layout")
    subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{reg.host}/public/single:v1",
            f"oci:{layout}:v1",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert reg.blob_gets() >= 4  # config + 3 layers through the proxy
    ls = subprocess.run(
        [umoci, "ls", "--layout", layout], check=True, capture_output=True, timeout=60
    ).stdout.decode()
    assert ls.split() == ["v1"]
    stat = subprocess.run(
        [umoci, "stat", "--json", "--image", f"{layout}:v1"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert len(json.loads(stat)["history"]) == 3
    with open(os.path.join(layout, "index.json")) as f:
        assert json.load(f)["manifests"][0]["digest"] == info.digest
