"""Engine-ready models end to end (DESIGN section 8): each packaging pushed to a real
docker-registry the way its producer pushes it (tests/peers/modelpacks.py), pulled through
the API and the CLI, and the view checked the way an engine reads it: the GGUF at ``model``
opened and its header read, ``config.json`` loaded and every safetensors header parsed with
the standard library.  Plus: registries that bend the spec (an Ollama-like front, presigned
blob URLs that expire mid-download), hostile tars, --discard-unpacked-layers, and the cache
still an OCI layout skopeo and umoci read."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from peers import modelpacks as mp
from peers import require_binary
from peers.modelpacks import Entry
from peers.ollama import start_ollama_front

from nekko_sm import config as cfg
from nekko_sm.api import make_server
from nekko_sm.api_http import encode_url
from nekko_sm.credentials import Credentials
from nekko_sm.errors import UnsafeLayer
from nekko_sm.service import Service
from nekko_sm.store import REF_NAME, Store

ROOT = Path(__file__).resolve().parent.parent
ONE = mp.gguf_bytes("one", payload=b"\x01" * 64)
PACKS = {
    **mp.standard_packs(),
    # one GGUF and nothing else: ``path`` is the file itself
    "docker-v01-alone": mp.docker_model_v01([ONE], license=None),
    "modctl-tar-alone": mp.modctl({"model.gguf": ONE}),
    "kitops-gzip": mp.kitops(
        {"Kitfile": b"x", "models/m.gguf": ONE, "README.md": b"# kit\n"},
        {
            "manifestVersion": "1.0.0",
            "package": {"name": "t"},
            "model": {"name": "m", "path": "models/m.gguf"},
            "docs": [{"path": "README.md"}],
        },
        gzip_layers=True,
    ),
    "kitops-old": mp.kitops(
        {"Kitfile": b"x", "models/m.gguf": ONE},
        {
            "manifestVersion": "1.0.0",
            "package": {"name": "t"},
            "model": {"name": "m", "path": "models/m.gguf"},
        },
        old=True,
    ),
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pushed(registry) -> dict:
    """Every pack of PACKS on the session's registry, as ``models/NAME:v1``."""
    registry.reset()
    return {name: mp.push_pack(registry, f"models/{name}:v1", pack) for name, pack in PACKS.items()}


class Api:
    """The HTTP API of a Service, on 127.0.0.1."""

    def __init__(self, service: Service) -> None:
        import http.client

        self.http = http.client
        self.service = service
        self.server = make_server(service, cfg.parse_address("127.0.0.1:0"))
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        host, port = self.server.server_address[:2]
        c = self.http.HTTPConnection(host, port, timeout=120)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            payload = r.read()
            return r.status, json.loads(payload) if payload else None
        finally:
            c.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(make, registry):
    a = Api(make(registry.host))
    yield a
    a.close()


def cli(cache: Path, *args: str, hosts=(), env=None, timeout=120):
    argv = [
        sys.executable,
        "-m",
        "nekko_sm",
        "--cache-dir",
        str(cache),
        "--platform",
        "linux/amd64",
    ]
    for h in hosts:
        argv += ["--insecure-registry", h]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        argv + list(args), capture_output=True, text=True, check=False, timeout=timeout, env=e
    )


# --------------------------------------------------------------------------------------------
# what an engine does with the answer


def check_engine_ready(entry: dict, pack: mp.Pack) -> None:
    """The entry names every file of ``pack``'s view, under the names its tools give them,
    byte for byte; ``model`` is the GGUF llama.cpp loads; what vLLM reads parses."""
    assert entry["state"] == "complete"
    assert entry["format"] == pack.format
    assert sorted(f["name"] for f in entry["files"]) == sorted(pack.view)
    for f in entry["files"]:
        assert f["digest"] == sha(pack.view[f["name"]]), f["name"]
        assert Path(f["path"]).read_bytes() == pack.view[f["name"]]
    path = Path(entry["path"])
    assert path.is_absolute()
    if len(pack.view) == 1:  # one file and nothing else: the file itself
        [data] = pack.view.values()
        assert path.is_file() and path.read_bytes() == data
    else:
        assert path.is_dir()
        on_disk = {
            str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if not p.is_dir()
        }
        assert on_disk == pack.view
    if pack.model is None:
        assert "model" not in entry
    else:
        model = Path(entry["model"])
        assert model.is_absolute()
        assert model == (path if path.is_file() else path / pack.model)
        header = mp.parse_gguf(model.read_bytes())  # llama.cpp's first read
        assert header["version"] == 3 and "general.architecture" in header["kv"]
        if "-00001-of-" in pack.model:  # split shards side by side, under their names
            total = int(pack.model.rsplit("-of-", 1)[1].split(".")[0])
            for i in range(1, total + 1):
                shard = model.with_name(model.name.replace("-00001-of-", f"-{i:05d}-of-"))
                assert mp.parse_gguf(shard.read_bytes())["kv"]["split.no"] == i - 1
    if path.is_dir() and (path / "config.json").exists():  # transformers / vLLM
        json.loads((path / "config.json").read_text())
        for st in path.rglob("*.safetensors"):
            assert mp.parse_safetensors(st.read_bytes())


# --------------------------------------------------------------------------------------------
# each packaging, through the API and the CLI


@pytest.mark.parametrize("name", sorted(PACKS))
def test_each_packaging_through_the_api(api, pushed, name):
    url = pushed[name]
    status, entry = api.call("POST", "/content/", {"url": url})
    assert status == 201, entry
    check_engine_ready(entry, PACKS[name])
    status, again = api.call("GET", "/content/" + encode_url(url))
    assert status == 200 and again == entry
    assert api.service.store.verify() == []


@pytest.mark.parametrize("name", sorted(PACKS))
def test_each_packaging_through_the_cli(tmp_path, registry, pushed, name):
    cache = tmp_path / "cache"
    r = cli(cache, "pull", pushed[name], "--json", hosts=[registry.host])
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    check_engine_ready(entry, PACKS[name])
    r = cli(cache, "path", pushed[name])
    assert r.returncode == 0 and r.stdout.strip() == entry["path"]
    assert cli(cache, "verify").returncode == 0


def test_a_modelcar_keeps_its_whiteouts(make, registry, pushed):
    svc = make(registry.host)
    entry, _ = svc.pull(pushed["modelcar"])
    names = {f["name"] for f in entry["files"]}
    assert "stale.bin" not in names  # .wh.stale.bin in the top layer
    assert "cache/old.json" not in names and "cache/new.json" in names  # opaque directory
    assert not any(n.startswith(("bin/", "etc/", "dev/")) for n in names)  # only /models
    view = Path(entry["path"])
    assert not (view / "stale.bin").exists() and not (view / "cache" / "old.json").exists()
    assert (view / "current").read_bytes() == (view / "config.json").read_bytes()
    # What unpacking stored outside the view (busybox, stored while no models/ was known,
    # and the hidden files) was freed after the pull: nothing is left for gc.
    busybox = hashlib.sha256(b"\x7fELF busybox").hexdigest()
    assert not (svc.store.root / "blobs" / "sha256" / busybox).exists()
    assert svc.gc(dry_run=True).blobs_freed == []


# --------------------------------------------------------------------------------------------
# one blob per file, wherever it comes from


def test_a_safetensors_file_in_a_modelpack_tar_and_over_http_is_one_blob(make, registry, nginx):
    weights = mp.safetensors_bytes({"w": [0.5] * (300 * 1024)})  # 1.2 MB: streamed
    url = mp.push_pack(
        registry,
        "models/shared-st:v1",
        mp.modctl({"config.json": b"{}", "model.safetensors": weights}),
    )
    svc = make(registry.host)
    entry, _ = svc.pull(url)
    [st] = [f for f in entry["files"] if f["name"] == "model.safetensors"]
    before = set(svc.store.blobs())
    plain, _ = svc.pull(nginx.put("shared/model.safetensors", weights))
    assert plain["digest"] == st["digest"] == sha(weights)
    assert plain["path"] == st["path"]  # the same blob, one file on disk
    assert set(svc.store.blobs()) - before == {svc.store.get_entry(plain["url"]).digest}
    svc.remove(url)
    assert Path(plain["path"]).read_bytes() == weights  # the other source keeps it
    assert svc.store.verify() == []


# --------------------------------------------------------------------------------------------
# hostile tars


@pytest.mark.parametrize(
    "case",
    [
        "absolute path",
        "dot-dot",
        "symlink to /etc/passwd",
        "hard link to /etc/passwd",
        "character device",
    ],
)
def test_a_hostile_tar_is_refused_and_writes_nothing_outside_the_cache(
    make, registry, tmp_path, case
):
    pack = mp.replace_layer(
        mp.modctl({"config.json": b"{}"}),
        0,
        mp.tar_bytes(mp.HOSTILE[case]),
        "application/vnd.cncf.model.weight.v1.tar",
        {"org.cncf.model.filepath": "model.bin"},
    )
    tag = case.replace(" ", "-").replace("/", "")
    url = mp.push_pack(registry, f"models/hostile-{tag}:v1", pack)
    svc = make(registry.host)
    before = sorted(str(p) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    with pytest.raises(UnsafeLayer) as e:
        svc.pull(url)
    assert e.value.status == 400 and url in e.value.message
    assert svc.store.entries() == [] and not Path(svc.store.view_path(url)).exists()
    after = sorted(str(p) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == before
    assert not (svc.store.root / "etc").exists() and not (tmp_path / "escape").exists()
    assert svc.store.verify() == []
    r = cli(svc.store.root, "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_hostile_tar_through_the_api_is_a_400(api, registry):
    pack = mp.replace_layer(
        mp.modctl({"config.json": b"{}"}),
        0,
        mp.tar_bytes(mp.HOSTILE["dot-dot"]),
        "application/vnd.cncf.model.weight.v1.tar",
        {"org.cncf.model.filepath": "model.bin"},
    )
    url = mp.push_pack(registry, "models/hostile-api:v1", pack)
    status, body = api.call("POST", "/content/", {"url": url})
    assert status == 400 and body["error"]["code"] == "layer-unsafe"
    assert api.call("GET", "/healthz")[0] == 200  # the server keeps serving


# --------------------------------------------------------------------------------------------
# the cache stays an OCI layout; --discard-unpacked-layers


def test_skopeo_copies_an_unpacked_image_out_and_umoci_reads_the_layout(
    make, registry, pushed, tmp_path
):
    skopeo = require_binary("skopeo")
    umoci = require_binary("umoci")
    svc = make(registry.host)
    entry, _ = svc.pull(pushed["modelcar"])
    svc.store.flush()  # index.json is rewritten by group commit: current at exit or flush
    cache = svc.store.root
    r = subprocess.run(
        [umoci, "ls", "--layout", str(cache)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [entry["url"]]
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
    pack = PACKS["modelcar"]
    [d] = json.loads((out / "index.json").read_bytes())["manifests"]
    assert d["digest"] == pack.digest
    for digest, data in pack.blobs.items():
        assert (out / "blobs" / "sha256" / digest[7:]).read_bytes() == data


def _blob_bytes(store: Store) -> int:
    return sum(store.blob_path(d).stat().st_size for d in store.blobs())


def test_discard_unpacked_layers_keeps_the_files_only(make, registry, tmp_path):
    files = {
        "config.json": b'{"architectures": ["X"]}',
        "model-00001-of-00002.safetensors": mp.safetensors_bytes({"a": [1.0] * 400_000}),
        "model-00002-of-00002.safetensors": mp.safetensors_bytes({"b": [2.0] * 400_000}),
        "tokenizer.json": b"{}" * 1000,
    }
    pack = mp.modctl(files, gzip_layers=True)
    url = mp.push_pack(registry, "models/discard:v1", pack)
    svc = make(registry.host, discard_unpacked_layers=True)
    entry, _ = svc.pull(url)
    check_engine_ready(entry, pack)
    size = sum(len(b) for b in files.values())
    assert _blob_bytes(svc.store) <= 1.05 * size
    for layer in pack.doc["layers"]:  # every tar layer is gone
        assert not svc.store.has_blob(layer["digest"])
    assert svc.store.verify() == []
    assert svc.store.gc().blobs_freed == []  # the files stay reachable
    r = cli(svc.store.root, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    # verify checks the files themselves: damage one
    [st] = [f for f in entry["files"] if f["name"].startswith("model-00001")]
    blob = Path(st["path"])
    os.chmod(blob, 0o644)
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    assert (st["digest"], "digest mismatch") in svc.store.verify()
    # the environment variable says the same; a second pull of it is answered from the cache
    r = cli(
        tmp_path / "env-cache",
        "pull",
        url,
        "--json",
        hosts=[registry.host],
        env={"NEKKO_DISCARD_UNPACKED_LAYERS": "1"},
    )
    assert r.returncode == 0, r.stderr
    env_store = Store(tmp_path / "env-cache")
    assert _blob_bytes(env_store) <= 1.05 * size
    assert (
        cli(
            tmp_path / "env-cache",
            "pull",
            url,
            hosts=[registry.host],
            env={"NEKKO_DISCARD_UNPACKED_LAYERS": "1"},
        ).returncode
        == 0
    )


def test_without_discard_the_tar_layers_stay_and_rm_frees_everything(make, registry, pushed):
    svc = make(registry.host)
    pack = PACKS["modctl"]
    entry, _ = svc.pull(pushed["modctl"])
    for digest in pack.blobs:
        assert svc.store.has_blob(digest)
    svc.remove(pushed["modctl"])
    assert list(svc.store.blobs()) == []
    assert not Path(entry["path"]).exists()


# --------------------------------------------------------------------------------------------
# registries that bend the spec


@pytest.fixture
def ollama(registry):
    front = start_ollama_front(registry)
    yield front
    front.close()


def test_an_ollama_like_registry(make, ollama):
    """No /v2/ ping, manifests as text/plain without Content-Length, blobs redirected."""
    pack = PACKS["ollama"]
    url = mp.push_pack(ollama, "library/tiny:latest", pack)
    svc = make(ollama.host)
    entry, _ = svc.pull(url)
    check_engine_ready(entry, pack)
    assert [f["name"] for f in entry["files"]] == sorted(pack.view)
    paths = [r.path for r in ollama.requests]
    assert "/v2/" in paths and any(r.status == 404 and r.path == "/v2/" for r in ollama.requests)
    assert {r.status for r in ollama.requests if r.blob_digest} == {307}
    assert ollama.blob_host_requests  # the bytes came from the "CDN"
    assert not any(r.has_authorization for r in ollama.blob_host_requests)


def test_a_manifest_without_a_media_type_served_as_text_plain(make, ollama):
    """kit writes no ``mediaType`` in its manifests; with text/plain the shape decides."""
    pack = PACKS["kitops"]
    assert "mediaType" not in pack.doc
    url = mp.push_pack(ollama, "kit/model:v1", pack)
    entry, _ = make(ollama.host).pull(url)
    check_engine_ready(entry, pack)


def test_presigned_urls_that_expire_mid_download_are_asked_for_again(make, registry):
    """Each presigned URL serves 256 KiB and expires: the registry is asked again, and the
    download resumes where it was, every byte fetched once."""
    model = mp.gguf_bytes("big", payload=os.urandom(3 << 20))
    pack = mp.docker_model_v01([model], license=None)
    with registry.configured(redirect_blobs=True, expire_blob_urls_after=256 << 10):
        url = mp.push_pack(registry, "models/expiring:v1", pack)
        entry, _ = make(registry.host).pull(url)
        digest = sha(model)
        asked = registry.blob_gets(digest)
        served = registry.blob_bytes(digest)
    assert Path(entry["path"]).read_bytes() == model
    assert asked >= len(model) // (256 << 10)  # a new URL each time one ran out
    assert served <= len(model) + (256 << 10)  # resumed, not started over


def test_expired_urls_in_a_ranged_download_with_tokens(make, auth_registry, tmp_path):
    """A big blob over several connections, from a registry with token auth: parts reuse
    the URL the registry gave until it expires (403), then ask the registry again with the
    token; the CDN never sees the token."""
    model = mp.gguf_bytes("ranged", payload=os.urandom(40 << 20))
    pack = mp.docker_model_v01([model], license=None)
    creds = auth_registry.credentials
    with auth_registry.configured(redirect_blobs=True, expire_blob_urls_after=8 << 20):
        url = mp.push_pack(auth_registry, "private/expiring:v1", pack, creds=creds)
        svc = make(auth_registry.host, jobs=4)
        entry, _ = svc.pull(url, credentials=Credentials.basic(*creds))
        refused = auth_registry.expired_url_refusals()
        cdn = list(auth_registry.blob_host_requests)
        asked = auth_registry.blob_gets(sha(model))
    assert Path(entry["path"]).read_bytes() == model
    assert refused >= 1  # a part found its URL spent and went back to the registry
    assert asked >= 2  # ... and was given a new one
    assert not any(r.has_authorization for r in cdn)


def test_the_index_entry_names_the_files_listing(make, registry, pushed):
    """index.json keeps pointing at the image manifest (skopeo and umoci read it); the
    unpacked files are reached through a listing the entry names."""
    svc = make(registry.host)
    svc.pull(pushed["kitops"])
    [desc] = svc.store.entries()
    assert desc.digest == PACKS["kitops"].digest and desc.annotations[REF_NAME]
    listing = desc.annotations["io.nekko.files"]
    doc = json.loads(svc.store.read_blob(listing))
    assert doc["artifactType"] == "application/vnd.nekko.files.v1"
    titles = sorted(d["annotations"]["org.opencontainers.image.title"] for d in doc["layers"])
    assert titles == sorted(PACKS["kitops"].view)
    assert desc.annotations["io.nekko.format"] == "kitops"


def test_an_image_link_to_nothing_outside_models_does_not_fail_the_pull(make, registry):
    """Real images hold dangling links (/etc/mtab -> /proc/self/mounts); a modelcar's view
    is /models, which they are not part of."""
    files = {"config.json": b"{}", "model.safetensors": mp.safetensors_bytes({"w": [1.0]})}
    layers = [
        [
            Entry("etc", type="dir"),
            Entry("etc/mtab", type="symlink", linkname="/proc/self/mounts"),
            Entry("models", type="dir"),
        ]
        + [Entry(f"models/{n}", d) for n, d in files.items()]
    ]
    pack = mp.image(layers, files)
    url = mp.push_pack(registry, "models/car-mtab:v1", pack)
    entry, _ = make(registry.host).pull(url)
    check_engine_ready(entry, pack)


# --------------------------------------------------------------------------------------------
# unpacking while the layer downloads


def _weights_pack(size: int = 3 << 20) -> tuple[mp.Pack, str]:
    pack = mp.modctl({"config.json": b"{}", "weights.bin": os.urandom(size)})
    [layer] = [
        d["digest"]
        for d in pack.doc["layers"]
        if d["annotations"]["org.cncf.model.filepath"] == "weights.bin"
    ]
    return pack, layer


@pytest.fixture
def followed(monkeypatch):
    """The digests whose download the unpacker read as it arrived; a layer's commit waits
    (up to 10 s) until the unpacker follows it, so the test does not depend on timing."""
    from nekko_sm.store import IngestWriter

    seen: dict = {}
    cond = threading.Condition()
    follow, commit = IngestWriter.follow, IngestWriter.commit

    def recording_follow(self, size, stop):
        with cond:
            seen[self.ref] = seen.get(self.ref, 0) + 1
            cond.notify_all()
        return follow(self, size, stop)

    def waiting_commit(self, expected_digest=None, lease=None):
        if self.ref in seen.get("wait", ()):
            with cond:
                cond.wait_for(lambda: self.ref in seen, timeout=10)
        return commit(self, expected_digest, lease)

    monkeypatch.setattr(IngestWriter, "follow", recording_follow)
    monkeypatch.setattr(IngestWriter, "commit", waiting_commit)
    return seen


def test_a_tar_layer_is_unpacked_while_it_downloads(make, registry, followed):
    pack, layer = _weights_pack()
    url = mp.push_pack(registry, "models/follow:v1", pack)
    followed["wait"] = {layer}
    registry.reset()
    registry.drop_blob_once(layer, 1 << 20)  # and the download breaks in the middle
    entry, _ = make(registry.host).pull(url)
    check_engine_ready(entry, pack)
    assert followed.get(layer) == 1
    assert registry.blob_gets(layer) == 2  # resumed: the unpacker read on behind it
    assert registry.blob_bytes(layer) <= len(pack.blobs[layer]) + (1 << 20)


def test_a_layer_that_starts_over_is_unpacked_again_from_its_blob(make, registry, followed, caplog):
    pack, layer = _weights_pack()
    url = mp.push_pack(registry, "models/restart:v1", pack)
    followed["wait"] = {layer}
    with registry.configured(ignore_ranges=True):
        registry.drop_blob_once(layer, 1 << 20)  # the resume gets the whole blob (200)
        with caplog.at_level("INFO", logger="nekko_sm.oci"):
            entry, _ = make(registry.host).pull(url)
    check_engine_ready(entry, pack)
    assert followed.get(layer) == 1
    assert "unpacking from the blobs" in caplog.text


def test_a_hostile_tar_found_while_downloading_still_waits_for_the_digest(make, registry, followed):
    """What the unpacker refuses is reported only once the bytes verified: a bad tar is
    the publisher's (400), bytes that do not match their digest the registry's (502)."""
    pack = mp.replace_layer(
        mp.modctl({"config.json": b"{}"}),
        0,
        mp.tar_bytes(mp.HOSTILE["dot-dot"] + [Entry("pad", os.urandom(2 << 20))]),
        "application/vnd.cncf.model.weight.v1.tar",
        {"org.cncf.model.filepath": "model.bin"},
    )
    [layer] = [d["digest"] for d in pack.doc["layers"]]
    url = mp.push_pack(registry, "models/hostile-follow:v1", pack)
    followed["wait"] = {layer}
    svc = make(registry.host)
    with pytest.raises(UnsafeLayer):
        svc.pull(url)
    assert followed.get(layer) == 1 and svc.store.has_blob(layer)  # verified, then refused
    assert svc.store.entries() == [] and svc.store.verify() == []


def test_a_follower_reads_behind_the_frontier(tmp_path):
    from nekko_sm.errors import Cancelled
    from nekko_sm.store import FollowLost

    store = Store(tmp_path / "c").init()
    data = os.urandom(3 << 20)
    stop = threading.Event()
    with store.writer("follow-test", len(data)) as w:
        reader = w.follow(len(data), stop.is_set)
        got = []
        t = threading.Thread(target=lambda: got.append(reader.read(len(data))))
        t.start()
        for i in range(0, len(data), 1 << 20):
            assert t.is_alive()  # still waiting for the rest
            w.write(data[i : i + (1 << 20)])
        t.join(10)
        assert got == [data]
        assert reader.read(10) == b""  # the end
        w.commit(sha(data))
    reader.close()
    with store.writer("follow-reset", 100) as w:
        reader = w.follow(100, stop.is_set)
        w.write(b"x" * 10)
        assert reader.read(10) == b"x" * 10
        w.reset()
        with pytest.raises(FollowLost):
            reader.read(10)
        reader.close()
        reader = w.follow(100, stop.is_set)
        stop.set()
        with pytest.raises(Cancelled):
            reader.read(10)
        reader.close()


def test_a_second_name_of_an_unpacked_image_reuses_its_files(make, registry):
    """The same manifest under another name (a digest, another tag) is not unpacked again;
    with --discard-unpacked-layers its tar layers are not even downloaded again."""
    pack = mp.modctl({"config.json": b"{}", "weights.bin": os.urandom(1 << 20)})
    url = mp.push_pack(registry, "models/twice:v1", pack)
    by_digest = url.rsplit(":", 1)[0] + "@" + pack.digest
    svc = make(registry.host, discard_unpacked_layers=True)
    first, _ = svc.pull(url)
    registry.reset()
    second, _ = svc.pull(by_digest)
    check_engine_ready(second, pack)
    assert [(f["name"], f["digest"]) for f in second["files"]] == [
        (f["name"], f["digest"]) for f in first["files"]
    ]
    tars = [d["digest"] for d in pack.doc["layers"]]
    assert not any(registry.blob_gets(d) for d in tars)
    svc.remove(url)
    check_engine_ready(svc.status(by_digest), pack)  # the other name keeps its files
    assert svc.store.verify() == []
    svc.remove(by_digest)
    assert list(svc.store.blobs()) == []
