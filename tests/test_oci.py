"""OCI images and artifacts, through the service and the CLI, against a real docker-registry
(behind the counting proxy of tests/peers/registry.py) and its token server."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from peers import require_binary
from peers.images import MODEL_ARTIFACT_TYPE, SHARED_LAYERS
from peers.tokenserver import ALICE_TOKEN, CREDENTIALS

from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    IntegrityError,
    ManifestInvalid,
    NoMatchingPlatform,
    Unauthorized,
    UnsafeName,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.service import Service
from nekko_sm.sources import oci_fetch, registry_auth
from nekko_sm.store import MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST, REF_NAME, Store

ROOT = Path(__file__).resolve().parent.parent
BASIC = base64.b64encode(f"{CREDENTIALS[0]}:{CREDENTIALS[1]}".encode()).decode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def svc(make, reg):
    return make(reg.host)


@pytest.fixture
def cli(tmp_path):
    cache = tmp_path / "cli-cache"

    def run(*args, hosts=(), timeout=60):
        argv = [sys.executable, "-m", "nekko_sm", "--cache-dir", str(cache)]
        for h in hosts:
            argv += ["--insecure-registry", h]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        return subprocess.run(
            argv + list(args),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=env,
            cwd=tmp_path,
        )

    run.cache = cache
    return run


def blob(svc: Service, digest: str) -> bytes:
    return svc.store.blob_path(digest).read_bytes()


def index_json(cache: Path) -> dict:
    return json.loads((cache / "index.json").read_bytes())


def rootfs(store, info) -> dict:
    """name -> bytes of an image's file system, read from its layers in the cache with
    tarfile (the test images have no whiteouts and no links)."""
    out = {}
    for d in info.layers:
        with tarfile.open(store.blob_path(d["digest"]), "r:gz") as tar:
            for m in tar:
                if m.isreg():
                    out[m.name] = tar.extractfile(m).read()
    return out


def check_view(store, entry: dict, expected: dict) -> None:
    """The entry's files and its view directory hold exactly ``expected`` (name -> bytes)."""
    assert sorted(f["name"] for f in entry["files"]) == sorted(expected)
    view = Path(entry["path"])
    for f in entry["files"]:
        assert f["digest"] == sha(expected[f["name"]]) and f["size"] == len(expected[f["name"]])
        assert Path(f["path"]).read_bytes() == expected[f["name"]]
        assert (view / f["name"]).read_bytes() == expected[f["name"]]


# --------------------------------------------------------------------------------------------
# each kind of image


def test_single_image(svc, reg, seeded):
    info = seeded["public/single:v1"]
    entry, created = svc.pull(info.url)
    assert created
    assert entry["url"] == info.url and entry["state"] == "complete"
    assert entry["digest"] == info.digest and "manifest" not in entry
    # an ordinary image is its file system (DESIGN section 8): the layers, unpacked
    assert entry["format"] == "image" and "model" not in entry
    files = rootfs(svc.store, info)
    assert len(files) == 2 * len(info.layers)
    check_view(svc.store, entry, files)
    assert entry["size"] == sum(len(b) for b in files.values())
    assert blob(svc, info.digest) == info.manifest  # byte for byte as served
    for d in info.blob_digests():
        assert svc.store.verify_blob(d)
    [desc] = svc.store.entries()
    assert desc.media_type == MT_OCI_MANIFEST and desc.digest == info.digest
    assert desc.size == info.size and desc.annotations[REF_NAME] == info.url
    assert Path(entry["path"]).is_dir()
    # a second pull is answered from the cache without asking the registry
    reg.clear()
    again, created = svc.pull(info.url)
    assert not created and again["last_used"] > entry["last_used"]  # a use (DESIGN 9)
    assert {**again, "last_used": 0} == {**entry, "last_used": 0}
    assert reg.requests == []


def test_docker_v2_schema2_image(svc, seeded):
    info = seeded["public/docker:v1"]
    entry, _ = svc.pull(info.url)
    assert info.media_type == MT_DOCKER_MANIFEST
    assert entry["digest"] == info.digest
    assert svc.store.get_entry(info.url).media_type == MT_DOCKER_MANIFEST
    assert blob(svc, info.digest) == info.manifest
    assert svc.store.has_blob(info.config_digest, info.config_size)
    assert entry["format"] == "image"
    check_view(svc.store, entry, rootfs(svc.store, info))


def test_multi_arch_picks_the_configured_platform(svc, reg, seeded):
    info = seeded["public/multi:v1"]
    amd64 = info.platforms["linux/amd64"]
    entry, _ = svc.pull(info.url)
    assert entry["digest"] == info.index_digest  # what the tag resolved to
    assert entry["manifest"] == amd64.digest and entry["platform"] == "linux/amd64"
    check_view(svc.store, entry, rootfs(svc.store, amd64))
    desc = svc.store.get_entry(info.url)
    assert desc.digest == amd64.digest and desc.platform == {"architecture": "amd64", "os": "linux"}
    # only the chosen image's blobs were fetched: no other platform, no attestation
    fetched = {r.blob_digest for r in reg.requests if r.blob_digest}
    assert fetched == amd64.blob_digests()


@pytest.mark.parametrize(
    "asked,expect",
    [
        ("linux/arm64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/aarch64", "linux/arm64"),
    ],
)
def test_platform_per_request(svc, seeded, asked, expect):
    info = seeded["public/multi:v1"]
    entry, _ = svc.pull(info.url, platform=asked)
    assert entry["digest"] == info.index_digest
    assert entry["manifest"] == info.platforms[expect].digest
    assert entry["platform"] == expect


def test_each_platform_is_its_own_entry(svc, reg, seeded):
    """Issue 9, finding 7: a caller asking for arm64 never decides what amd64 callers get."""
    info = seeded["public/multi:v1"]
    arm, _ = svc.pull(info.url, platform="linux/arm64")
    assert arm["url"] == info.url + "?platform=linux/arm64" and arm["platform"] == "linux/arm64"
    assert svc.pull(info.url, platform="linux/arm64")[0]["platform"] == "linux/arm64"
    host, created = svc.pull(info.url)  # no platform asked: the host's, pulled now
    assert created and host["url"] == info.url and host["platform"] == "linux/amd64"
    assert svc.pull(info.url, platform="linux/amd64")[0]["url"] == info.url  # the same entry
    assert svc.pull(info.url + "?platform=linux/arm64")[1] is False  # the URL spelling
    assert svc.status(info.url + "?platform=linux/arm64")["platform"] == "linux/arm64"
    svc.remove(info.url)
    assert svc.status(info.url + "?platform=linux/arm64")["state"] == "complete"
    assert svc.store.verify() == []


def test_an_older_cache_entry_for_another_platform_is_pulled_again(svc, seeded):
    """Before keys named the platform, an arm64 pull sat under the plain URL: not an answer."""
    info = seeded["public/multi:v1"]
    arm, _ = svc.pull(info.url, platform="linux/arm64")
    desc = svc.store.get_entry(arm["url"])
    svc.store.remove_entry(arm["url"])
    svc.store.put_entry(info.url, desc)  # as the old code stored it
    entry, created = svc.pull(info.url)
    assert created and entry["platform"] == "linux/amd64"


def test_platform_all_keeps_the_whole_index(make, reg, seeded):
    svc = make(reg.host, platform="all")
    info = seeded["public/multi:v1"]
    entry, _ = svc.pull(info.url)
    assert entry["url"] == info.url + "?platform=all"
    assert entry["digest"] == info.index_digest and "manifest" not in entry
    desc = svc.store.get_entry(entry["url"])
    assert desc.media_type == MT_OCI_INDEX and blob(svc, info.digest) == info.manifest
    for sub in list(info.platforms.values()) + info.attestations:
        assert blob(svc, sub.digest) == sub.manifest
        for d in sub.blob_digests():
            assert svc.store.verify_blob(d), d
    names = {f["name"] for f in entry["files"]}
    assert {n.split("/")[0] for n in names} == {"linux-amd64", "linux-arm64", "linux-arm-v7"}
    att_layers = {d for a in info.attestations for d in a.layer_digests}
    assert not att_layers & {f["digest"] for f in entry["files"]}
    assert svc.store.verify() == []


def test_unknown_platform_lists_the_available_ones(svc, seeded):
    info = seeded["public/multi:v1"]
    with pytest.raises(NoMatchingPlatform) as e:
        svc.pull(info.url, platform="linux/s390x")
    assert e.value.status == 404
    for p in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        assert p in e.value.message
    assert "unknown" not in e.value.message  # attestations are not platforms
    assert svc.store.entries() == []


def test_artifact_with_titled_layers(svc, seeded):
    info = seeded["public/model:v1"]
    entry, _ = svc.pull(info.url)
    assert entry["digest"] == info.digest
    assert [f["name"] for f in entry["files"]] == [
        "model.gguf",
        "tokenizer/tokenizer.json",
        "config.json",
    ]
    view = Path(entry["path"])
    for name, d in info.files.items():
        assert (view / name).read_bytes() == blob(svc, d["digest"])
    assert (view / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert svc.store.get_entry(info.url).artifact_type == MODEL_ARTIFACT_TYPE


def test_pull_by_digest(svc, seeded):
    info = seeded["public/single:v1"]
    url = f"oci://{info.host}/{info.repo}@{info.digest}"
    entry, _ = svc.pull(url)
    assert entry["url"] == url and entry["digest"] == info.digest


def test_unknown_digest_is_not_found(svc, seeded):
    info = seeded["public/single:v1"]
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull(f"oci://{info.host}/{info.repo}@sha256:{'0' * 64}")
    assert e.value.status == 404 and "not found" in e.value.message
    with pytest.raises(UpstreamNotFound):
        svc.pull(f"oci://{info.host}/public/nothing-here:v1")


def test_expected_digest_mismatch_is_refused(svc, seeded):
    info = seeded["public/single:v1"]
    with pytest.raises(IntegrityError) as e:
        svc.pull(info.url, digest="sha256:" + "1" * 64)
    assert e.value.status == 502 and info.digest in e.value.message
    assert svc.store.entries() == []
    # the right one (for a multi-arch tag, the index's or the platform manifest's) is fine
    multi = seeded["public/multi:v1"]
    assert (
        svc.pull(multi.url, digest=multi.platforms["linux/amd64"].digest)[0]["digest"]
        == multi.index_digest
    )


def test_a_429_is_retried(svc, reg, seeded):
    info = seeded["public/docker:v1"]
    with reg.configured(fail_with=429, fail_times=2, retry_after=0):
        assert svc.pull(info.url)[0]["digest"] == info.digest
        assert [r.status for r in reg.requests][:2] == [429, 429]


# --------------------------------------------------------------------------------------------
# authentication


def test_private_repo_needs_credentials(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    with pytest.raises(Unauthorized) as e:
        svc.pull(info.url)
    assert e.value.status == 401 and "needs credentials" in e.value.message
    assert info.url in e.value.message
    with pytest.raises(Unauthorized) as e:
        svc.pull(info.url, Credentials.make(base64.b64encode(b"alice:wrong").decode(), "Basic"))
    assert "check them" in e.value.message
    assert svc.store.entries() == []


def test_private_repo_with_basic_credentials(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    entry, _ = svc.pull(info.url, Credentials.make(BASIC, "Basic"))
    assert entry["digest"] == info.digest
    ts = areg.token_server.requests
    assert ts and all(r.auth == "basic" and r.user == "alice" for r in ts)
    assert ts[0].scopes == ["repository:private/single:pull"]
    # every registry request after the ping carried the token; the password went nowhere else
    assert all(r.has_authorization for r in areg.requests if r.path != "/v2/")


def test_private_repo_with_bearer_credentials(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    entry, _ = svc.pull(info.url, Credentials.make(ALICE_TOKEN))  # exchanged when challenged
    assert entry["digest"] == info.digest
    assert [r.auth for r in areg.token_server.requests] == ["bearer"]
    assert areg.requests[0].has_authorization  # sent as is to the registry first


def test_anonymous_token_flow_and_token_cache(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["public/single:v1"]
    assert svc.pull(info.url)[0]["digest"] == info.digest
    assert [(r.auth, r.status) for r in areg.token_server.requests] == [(None, 200)]
    # the same repository again (another URL): the cached token is used
    assert svc.pull(f"oci://{info.host}/{info.repo}@{info.digest}")[0]["digest"] == info.digest
    assert len(areg.token_server.requests) == 1


def test_refused_token_is_renewed_once(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["public/single:v1"]
    svc.pull(info.url)
    cache = registry_auth.token_cache_for(svc.transfer)
    with cache._lock:
        for key, (_tok, exp) in list(cache._tokens.items()):
            cache._tokens[key] = ("expired-or-revoked", exp)
    areg.clear()
    areg.token_server.clear()
    assert svc.pull(f"oci://{info.host}/{info.repo}@{info.digest}")[0]["digest"] == info.digest
    assert [r.status for r in areg.requests if "/manifests/" in r.path] == [401, 200]
    assert len(areg.token_server.requests) == 1


def test_401_on_a_blob_renews_the_token_once(make, areg, auth_seeded, tmp_path):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    big = max(info.layers, key=lambda d: d["size"])["digest"]
    with areg.configured(fail_with=401, fail_times=1, fail_match=big):
        entry, _ = svc.pull(info.url, Credentials.make(BASIC, "Basic"))
        assert [r.status for r in areg.requests if r.blob_digest == big] == [401, 200]
        assert [r.auth for r in areg.token_server.requests] == ["basic", "basic"]
    assert entry["digest"] == info.digest
    one = make(areg.host, cache=tmp_path / "other", jobs=1)
    with areg.configured(fail_with=401, fail_times=2, fail_match="/blobs/"):
        with pytest.raises(Unauthorized):  # refused again after renewing: give up
            one.pull(info.url, Credentials.make(BASIC, "Basic"))
        assert [r.status for r in areg.requests if r.blob_digest] == [401, 401]


# --------------------------------------------------------------------------------------------
# dedup and removal


def test_shared_layers_are_fetched_and_stored_once(svc, reg, seeded):
    a, b = seeded["public/share-a:v1"], seeded["public/share-b:v1"]
    shared = a.layer_digests[: len(SHARED_LAYERS)]
    assert shared == b.layer_digests[: len(SHARED_LAYERS)]
    ea, _ = svc.pull(a.url)
    eb, _ = svc.pull(b.url)
    for d in shared:
        assert reg.blob_gets(d) == 1
    assert svc.stats["bytes_deduplicated"] == sum(a.layer_sizes[: len(SHARED_LAYERS)])
    # the layers, their files (those of the shared layers once), each image's file listing
    files = {f["digest"] for f in ea["files"] + eb["files"]}
    assert len(files) == 2 * (len(a.layers) + len(b.layers) - len(SHARED_LAYERS))
    listings = {svc.store.get_entry(i.url).annotations["io.nekko.files"] for i in (a, b)}
    assert sorted(svc.store.blobs()) == sorted(
        a.blob_digests() | b.blob_digests() | {a.digest, b.digest} | files | listings | {sha(b"{}")}
    )


def test_concurrent_pulls_sharing_layers_fetch_each_once(svc, reg, seeded):
    a, b = seeded["public/share-a:v1"], seeded["public/share-b:v1"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: svc.pull(i.url)[0], (a, b)))
    assert [e["digest"] for e in results] == [a.digest, b.digest]
    for d in a.blob_digests() | b.blob_digests():
        assert reg.blob_gets(d) == 1, d
    assert svc.store.verify() == []


def test_removing_one_image_keeps_layers_another_image_needs(svc, seeded, cli, reg):
    # The earlier Go implementation's GC deleted other images' layers on rm.
    a, b = seeded["public/share-a:v1"], seeded["public/share-b:v1"]
    svc.pull(a.url)
    svc.pull(b.url)
    report = svc.remove(a.url)
    assert report["blobs_freed"] == 6  # a's manifest, config, own layer, its 2 files, listing
    for d in b.blob_digests() | {b.digest}:
        assert svc.store.verify_blob(d), d
    assert svc.store.verify() == []
    only_a = (a.blob_digests() | {a.digest}) - b.blob_digests()
    assert not any(svc.store.has_blob(d) for d in only_a)
    r = subprocess.run(
        [sys.executable, "-m", "nekko_sm", "--cache-dir", str(svc.store.root), "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# transport: redirects, resume, mirrors


def test_blob_redirect_to_other_host_carries_no_authorization(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    with areg.configured(redirect_blobs=True):
        entry, _ = svc.pull(info.url, Credentials.make(BASIC, "Basic"))
        redirected = [r for r in areg.requests if r.status == 307]
        hosted = list(areg.blob_host_requests)
    assert entry["digest"] == info.digest
    assert {r.blob_digest for r in redirected} == info.blob_digests()
    assert all(r.has_authorization for r in redirected)  # the registry got the token
    assert len(hosted) == len(info.blob_digests())
    assert all(not r.has_authorization and r.status == 200 for r in hosted)


def test_interrupted_layer_resumes_with_range(svc, reg, seeded):
    info = seeded["public/single:v1"]
    big = max(info.layers, key=lambda d: d["size"])
    reg.drop_blob_once(big["digest"], 100_000)
    entry, _ = svc.pull(info.url)
    assert entry["digest"] == info.digest
    gets = [r for r in reg.requests if r.blob_digest == big["digest"]]
    assert [r.range for r in gets] == [None, "bytes=100000-"]
    assert reg.blob_bytes(big["digest"]) == big["size"]  # nothing fetched twice
    assert svc.store.verify_blob(big["digest"])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def oci_log():
    """What nekko_sm.oci logs at INFO (whatever other tests did to the nekko_sm logger)."""
    logger = logging.getLogger("nekko_sm.oci")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_broken_mirror_falls_back_to_the_registry(make, reg, seeded, oci_log):
    mirror = reg.new_proxy(fail_with=500)
    svc = make(reg.host, registry_mirror=[f"{reg.host}=http://{mirror.host}"])
    info = seeded["public/single:v1"]
    entry, _ = svc.pull(info.url)
    assert entry["digest"] == info.digest
    assert mirror.requests and all(r.status == 500 for r in mirror.requests)
    assert len(mirror.requests) == 1  # no backing off on a mirror: the next endpoint at once
    assert reg.manifest_gets() == 1 and reg.blob_gets() == len(info.blob_digests())
    assert any("falling back" in m and mirror.host in m for m in oci_log)


def test_unreachable_mirror_falls_back_at_once(make, reg, seeded, oci_log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    svc = make(reg.host, registry_mirror=[f"{reg.host}=http://{dead}"])
    info = seeded["public/docker:v1"]
    started = time.monotonic()
    assert svc.pull(info.url)[0]["digest"] == info.digest
    assert time.monotonic() - started < 5  # no backoff on a mirror
    assert any("falling back" in m and dead in m for m in oci_log)


def test_working_mirror_is_used_with_ns(make, reg, seeded):
    mirror = reg.new_proxy()
    svc = make(reg.host, registry_mirror=[f"{reg.host}=http://{mirror.host}"])
    info = seeded["public/docker:v1"]
    assert svc.pull(info.url)[0]["digest"] == info.digest
    assert reg.requests == []
    assert mirror.blob_gets() == len(info.blob_digests())
    assert all(r.path.endswith(f"?ns={reg.host.replace(':', '%3A')}") for r in mirror.requests)


def test_mirror_is_never_given_the_credentials(make, areg, auth_seeded):
    mirror = areg.new_proxy()
    svc = make(areg.host, registry_mirror=[f"{areg.host}=http://{mirror.host}"])
    info = auth_seeded["private/single:v1"]
    entry, _ = svc.pull(info.url, Credentials.make(BASIC, "Basic"))
    assert entry["digest"] == info.digest
    assert mirror.manifest_gets() >= 1 and mirror.blob_gets() == 0  # anonymous: refused
    basic = [r for r in areg.token_server.requests if r.auth == "basic"]
    assert len(basic) == 1  # only the registry's exchange carried alice's password


# --------------------------------------------------------------------------------------------
# the cache is a real OCI layout


def test_cache_is_readable_by_skopeo_and_umoci(svc, seeded, tmp_path):
    skopeo = require_binary("skopeo")
    umoci = require_binary("umoci")
    info = seeded["public/single:v1"]
    svc.pull(info.url)
    svc.store.flush()  # index.json follows the database by group commit: now, not soon
    cache = svc.store.root
    r = subprocess.run(
        [umoci, "ls", "--layout", str(cache)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [info.url]
    # containers/image refuses "oci://…" as a reference name ("://" is not allowed in one),
    # so name no reference: with one entry in index.json, skopeo takes that one.
    out = tmp_path / "out"
    r = subprocess.run(
        [
            skopeo,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            f"oci:{cache}",
            f"oci:{out}:copy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    [d] = index_json(out)["manifests"]
    assert d["digest"] == info.digest
    copied = out / "blobs" / "sha256"
    assert (copied / info.digest[7:]).read_bytes() == info.manifest
    for digest in info.blob_digests():
        assert sha((copied / digest[7:]).read_bytes()) == digest
    assert {p.name for p in copied.iterdir()} == {
        d[7:] for d in info.blob_digests() | {info.digest}
    }


# --------------------------------------------------------------------------------------------
# the CLI


def test_cli_pull_each_kind(cli, reg, seeded):
    for ref in ("public/single:v1", "public/docker:v1", "public/model:v1"):
        info = seeded[ref]
        r = cli("--platform", "linux/amd64", "pull", info.url, "--json", hosts=[reg.host])
        assert r.returncode == 0, r.stderr
        entry = json.loads(r.stdout)
        assert entry["digest"] == info.digest
        if info.artifact_type:
            assert {f["digest"] for f in entry["files"]} == set(info.layer_digests)
        else:
            store = Store(cli.cache)
            check_view(store, entry, rootfs(store, info))
    r = cli("status", seeded["public/model:v1"].url)
    assert r.returncode == 0


def test_cli_platforms(cli, reg, seeded):
    info = seeded["public/multi:v1"]
    r = cli("pull", info.url, "--platform", "linux/arm64", "--json", hosts=[reg.host])
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["digest"] == info.index_digest
    assert entry["manifest"] == info.platforms["linux/arm64"].digest
    other = f"oci://{info.host}/{info.repo}@{info.index_digest}"
    r = cli("--platform", "windows/amd64", "pull", other, hosts=[reg.host])
    assert r.returncode == 1
    assert "linux/amd64, linux/arm/v7, linux/arm64" in r.stderr
    r = cli("--platform", "all", "pull", other, "--json", hosts=[reg.host])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == info.index_digest
    types = {d["annotations"][REF_NAME]: d["mediaType"] for d in index_json(cli.cache)["manifests"]}
    assert types == {
        info.url + "?platform=linux/arm64": MT_OCI_MANIFEST,
        other + "?platform=all": MT_OCI_INDEX,
    }


def test_cli_private_repo(cli, areg, auth_seeded):
    info = auth_seeded["private/single:v1"]
    r = cli("pull", info.url, hosts=[areg.host])
    assert r.returncode == 1 and "needs credentials" in r.stderr
    r = cli(
        "pull",
        info.url,
        "--credentials",
        BASIC,
        "--credentials-type",
        "Basic",
        "--json",
        hosts=[areg.host],
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == info.digest
    assert BASIC not in r.stdout + r.stderr


def test_cli_wrong_digest(cli, reg, seeded):
    info = seeded["public/single:v1"]
    r = cli("pull", f"oci://{info.host}/{info.repo}@sha256:{'0' * 64}", hosts=[reg.host])
    assert r.returncode == 1 and "not found" in r.stderr
    r = cli("pull", info.url, "--digest", "sha256:" + "2" * 64, hosts=[reg.host])
    assert r.returncode == 1 and "not the expected" in r.stderr


# --------------------------------------------------------------------------------------------
# pieces


def test_parse_challenges():
    assert registry_auth.parse_challenges(
        'Bearer realm="https://auth.example/token",service="reg",'
        'scope="repository:a/b:pull,push", Basic realm="x y"'
    ) == [
        (
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "reg",
                "scope": "repository:a/b:pull,push",
            },
        ),
        ("basic", {"realm": "x y"}),
    ]
    assert registry_auth.parse_challenges("basic realm=plain") == [("basic", {"realm": "plain"})]
    assert registry_auth.parse_challenges('Bearer realm="a\\"b"') == [("bearer", {"realm": 'a"b'})]
    assert registry_auth.parse_challenges("") == []


@pytest.mark.parametrize(
    "status,body,err",
    [
        (
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            Unauthorized,
        ),
        (
            403,
            {"errors": [{"code": "DENIED", "message": "requested access is denied"}]},
            Unauthorized,
        ),
        (404, {"errors": [{"code": "MANIFEST_UNKNOWN"}]}, UpstreamNotFound),
        (404, {"errors": [{"code": "NAME_UNKNOWN"}]}, UpstreamNotFound),
        (429, {"errors": [{"code": "TOOMANYREQUESTS"}]}, UpstreamUnavailable),
        (503, None, UpstreamUnavailable),
    ],
)
def test_registry_error(status, body, err):
    e = registry_auth.registry_error(
        status,
        "http://r/v2/x/manifests/y",
        json.dumps(body).encode() if body else b"",
        {},
        what="oci://r/x:y",
    )
    assert type(e) is err and e.message.startswith("oci://r/x:y")


class _FakePuller(oci_fetch.Puller):
    def __init__(self):
        from nekko_sm.refparse import parse_oci

        self.ref = parse_oci("oci://r.example/a/b:c")


def test_manifest_checks():
    p = _FakePuller()
    with pytest.raises(ManifestInvalid, match="schema 1"):
        p._check_manifest("c", json.dumps({"schemaVersion": 1, "name": "a/b"}).encode(), {})
    layer = {
        "mediaType": "x",
        "digest": "sha256:" + "a" * 64,
        "size": 1,
        "annotations": {"org.opencontainers.image.title": "../etc/passwd"},
    }
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": "y", "digest": "sha256:" + "b" * 64, "size": 2},
        "layers": [layer],
    }
    with pytest.raises(UnsafeName):
        p._check_manifest("c", json.dumps(doc).encode(), {})
    layer["annotations"] = {}
    data = json.dumps(doc).encode()
    with pytest.raises(IntegrityError, match="Docker-Content-Digest"):
        p._check_manifest("c", data, {"Docker-Content-Digest": "sha256:" + "c" * 64})
    with pytest.raises(IntegrityError):
        p._check_manifest("sha256:" + "d" * 64, data, {})
    assert p._check_manifest(sha(data), data, {"Docker-Content-Digest": sha(data)}).digest == sha(
        data
    )
    with pytest.raises(ManifestInvalid, match="media type"):
        p._check_manifest("c", json.dumps({**doc, "mediaType": "text/html"}).encode(), {})
