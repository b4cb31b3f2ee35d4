"""Test images, built deterministically in Python as OCI image layouts and pushed with skopeo.

Layers are tar.gz files made with ``tarfile``/``gzip`` (fixed mtimes, uid/gid 0, gzip mtime 0),
their payload from a seeded PRNG, so the same (seed, size) gives the same bytes -- and the same
digest -- in every run; a layer of size S holds a file of S random bytes, so its blob is S plus
about 1-2 KiB of tar/gzip overhead (random bytes do not compress).  Layers are generated and
hashed as a stream into the layout's blob directory, never held whole in memory.

:func:`seed_images` pushes the standard set and returns ``{"public/single:v1": ImageInfo, ...}``;
:func:`push_image` pushes one image of the given layer sizes (the benchmark's big image).  The
descriptors returned are read back from the registry after the push, so they are what a client
will be served.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peers.registry import CountingProxy, RegistryPeer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MODEL_ARTIFACT_TYPE = "application/vnd.nekko.model.v1"
IN_TOTO = "application/vnd.in-toto+json"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

MANIFEST_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}"

FIXED_MTIME = 1700000000  # 2023-11-14: every tar entry
CREATED = "2023-11-14T22:13:20Z"


# --------------------------------------------------------------------------------------------
# what seed_images / push_image return


@dataclass
class ImageInfo:
    """What the registry serves for one tag (or one platform of an index).

    * ``digest``/``media_type``/``manifest``: the tag's own manifest (an index for a multi-arch
      tag), bytes as served; ``size`` = len(manifest).
    * ``manifest_digest``: the image/artifact manifest's digest (None for an index);
      ``index_digest``: the index's (None for a single image).
    * ``config_digest``/``config_size``/``config_media_type`` and ``layers`` (descriptor dicts:
      ``digest``, ``size``, ``mediaType``, ``annotations`` when present): of the image manifest.
    * ``platform`` ("linux/arm/v7"), ``platforms`` (an index's images by platform string),
      ``attestations`` (an index's unknown/unknown attestation manifests), ``artifact_type``,
      ``files`` (an artifact's layers by ``org.opencontainers.image.title``).
    * ``host``/``url``: the counting proxy's ``127.0.0.1:PORT`` and ``oci://HOST/REPO:TAG``;
      ``layout``: the OCI layout it was pushed from (None when removed after a big push).
    """

    ref: str
    repo: str
    tag: str
    host: str
    url: str
    digest: str
    media_type: str
    manifest: bytes
    size: int
    manifest_digest: str | None = None
    index_digest: str | None = None
    config_digest: str | None = None
    config_size: int | None = None
    config_media_type: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    platform: str | None = None
    platforms: dict[str, ImageInfo] = field(default_factory=dict)
    attestations: list[ImageInfo] = field(default_factory=list)
    artifact_type: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str | None = None

    @property
    def layer_digests(self) -> list[str]:
        return [d["digest"] for d in self.layers]

    @property
    def layer_sizes(self) -> list[int]:
        return [d["size"] for d in self.layers]

    @property
    def total_size(self) -> int:
        """Bytes of the manifest, config and layers (for an index: everything it lists)."""
        n = self.size + (self.config_size or 0) + sum(self.layer_sizes)
        for sub in list(self.platforms.values()) + self.attestations:
            n += sub.total_size
        return n

    def for_platform(self, platform: str) -> ImageInfo:
        return self.platforms[platform] if self.platforms else self

    def blob_digests(self) -> set[str]:
        """Config and layer digests (for an index: of every image it lists)."""
        out = set(self.layer_digests)
        if self.config_digest:
            out.add(self.config_digest)
        for sub in list(self.platforms.values()) + self.attestations:
            out |= sub.blob_digests()
        return out


# --------------------------------------------------------------------------------------------
# building OCI layouts


class _HashWriter:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.n = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.n += len(data)
        self.target.write(data)
        return len(data)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.target.flush()


class _RandomReader:
    """``size`` bytes from a PRNG seeded with ``seed``, generated 1 MiB at a time (so the bytes
    do not depend on how the caller reads)."""

    BLOCK = 1 << 20

    def __init__(self, seed: Any, size: int) -> None:
        self.rng = random.Random(seed)
        self.left = size
        self.block = b""
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        n = min(n, self.left)
        parts = []
        while n > 0:
            if self.pos == len(self.block):
                self.block = self.rng.getrandbits(self.BLOCK * 8).to_bytes(self.BLOCK, "little")
                self.pos = 0
            take = min(n, len(self.block) - self.pos)
            parts.append(self.block[self.pos : self.pos + take])
            self.pos += take
            n -= take
            self.left -= take
        return b"".join(parts)


def random_bytes(seed: Any, size: int) -> bytes:
    """The same bytes a layer of (seed, size) holds in its data file."""
    return _RandomReader(seed, size).read(size)


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion": "1.0.0"}')
        self.refs: list[dict[str, Any]] = []

    def blob_path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        return os.path.join(self.path, "blobs", algo, hexd)

    def put(self, blob: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        """Store ``blob``; its descriptor, with ``extra`` fields (``annotations``, ``data``)."""
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        path = self.blob_path(digest)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(blob)
            os.replace(path + ".tmp", path)
        return {"mediaType": media_type, "digest": digest, "size": len(blob), **extra}

    def put_json(self, obj: Any, media_type: str, **extra: Any) -> dict[str, Any]:
        return self.put(canonical_json(obj), media_type, **extra)

    def put_layer(
        self, files: list[tuple[str, int, Any]], compresslevel: int = 1
    ) -> tuple[dict[str, Any], str]:
        """A tar.gz layer of ``files`` = [(name, size, seed)], streamed to disk.  Returns
        (descriptor, diff_id)."""
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.path, "blobs", "sha256"), suffix=".layer")
        try:
            with os.fdopen(fd, "wb") as raw:
                compressed = _HashWriter(raw)
                with gzip.GzipFile(
                    filename="",
                    mode="wb",
                    fileobj=compressed,  # type: ignore[arg-type]
                    compresslevel=compresslevel,
                    mtime=0,
                ) as gz:
                    plain = _HashWriter(gz)
                    with tarfile.open(
                        fileobj=plain,
                        mode="w|",  # type: ignore[call-overload]
                        format=tarfile.PAX_FORMAT,
                    ) as tar:
                        dirs: set[str] = set()
                        for name, size, seed in files:
                            parts = name.split("/")[:-1]
                            for i in range(1, len(parts) + 1):
                                d = "/".join(parts[:i])
                                if d not in dirs:
                                    dirs.add(d)
                                    tar.addfile(_tarinfo(d + "/", 0, tarfile.DIRTYPE))
                            tar.addfile(
                                _tarinfo(name, size, tarfile.REGTYPE), _RandomReader(seed, size)
                            )
            digest = "sha256:" + compressed.sha.hexdigest()
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        desc = {"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": compressed.n}
        return desc, "sha256:" + plain.sha.hexdigest()

    def tag(self, desc: dict[str, Any], name: str) -> None:
        d = dict(desc)
        d["annotations"] = {**d.get("annotations", {}), REF_NAME: name}
        self.refs.append(d)
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(
                canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs})
            )


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def _tarinfo(name: str, size: int, typ: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size if typ == tarfile.REGTYPE else 0
    ti.type = typ
    ti.mtime = FIXED_MTIME
    ti.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def _platform_dict(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    d = {"architecture": parts[1], "os": parts[0]}
    if len(parts) > 2:
        d["variant"] = parts[2]
    return d


def build_image(
    layout: Layout,
    layer_sizes: Iterable[int],
    seed: Any,
    platform: str = "linux/amd64",
    *,
    shared: Iterable[tuple[int, Any]] = (),
    compresslevel: int | None = None,
) -> dict[str, Any]:
    """Write one image (config + layers + manifest) to ``layout``; returns the manifest's
    descriptor (with ``platform``).  Layers are ``shared`` [(size, seed)] first -- identical
    bytes wherever the same (size, seed) is used -- then one per ``layer_sizes``.
    ``compresslevel`` default: 1, or 0 (stored: valid gzip, 5x faster, and random bytes do not
    compress anyway) for a layer over 8 MiB."""
    specs = [(size, s) for size, s in shared]
    specs += [(size, f"{seed}/layer{i}") for i, size in enumerate(layer_sizes)]
    layers, diff_ids, history = [], [], []
    for size, s in specs:
        tag = hashlib.sha256(str(s).encode()).hexdigest()[:12]
        level = compresslevel if compresslevel is not None else (0 if size > 8 << 20 else 1)
        desc, diff_id = layout.put_layer(
            [(f"data/{tag}.bin", size, s), (f"data/{tag}.txt", 24, f"{s}/txt")], level
        )
        layers.append(desc)
        diff_ids.append(diff_id)
        history.append({"created": CREATED, "created_by": f"nekko-test layer {s} ({size} bytes)"})
    config = {
        "created": CREATED,
        **_platform_dict(platform),
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"nekko.test.seed": str(seed)},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    cdesc = layout.put_json(config, OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": layers}
    mdesc = layout.put_json(manifest, OCI_MANIFEST)
    mdesc["platform"] = _platform_dict(platform)
    return mdesc


def build_attestation(layout: Layout, subject: dict[str, Any], seed: Any) -> dict[str, Any]:
    """A buildkit-style attestation manifest (in-toto SPDX layer) for ``subject``, as the index
    descriptor buildkit writes: platform unknown/unknown and the vnd.docker.reference.* keys."""
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [
            {
                "name": f"pkg:docker/nekko-test@{seed}",
                "digest": {"sha256": subject["digest"].partition(":")[2]},
            }
        ],
        "predicate": {"spdxVersion": "SPDX-2.3", "name": f"sbom-{seed}", "packages": []},
    }
    layer = layout.put_json(
        statement, IN_TOTO, annotations={"in-toto.io/predicate-type": "https://spdx.dev/Document"}
    )
    config = {
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    cdesc = layout.put_json(config, OCI_CONFIG)
    mdesc = layout.put_json(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": [layer]},
        OCI_MANIFEST,
    )
    mdesc["platform"] = {"architecture": "unknown", "os": "unknown"}
    mdesc["annotations"] = {
        "vnd.docker.reference.digest": subject["digest"],
        "vnd.docker.reference.type": "attestation-manifest",
    }
    return mdesc


def build_index(
    layout: Layout,
    platforms: list[str],
    seed: Any,
    layer_sizes: list[int],
    attestations: bool = True,
) -> dict[str, Any]:
    images = [build_image(layout, layer_sizes, f"{seed}/{p}", p) for p in platforms]
    atts = (
        [build_attestation(layout, m, f"{seed}/{i}") for i, m in enumerate(images)]
        if attestations
        else []
    )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": images + atts}
    return layout.put_json(index, OCI_INDEX)


def build_model_artifact(layout: Layout, seed: Any, model_size: int = 300_000) -> dict[str, Any]:
    """An OCI artifact: artifactType, empty config ``{}``, one layer per file with
    ``org.opencontainers.image.title`` (``model.gguf``, ``tokenizer/tokenizer.json``,
    ``config.json``)."""
    gguf = b"GGUF" + (3).to_bytes(4, "little") + random_bytes(f"{seed}/gguf", model_size - 8)
    tokenizer = canonical_json(
        {"version": "1.0", "model": {"type": "BPE", "vocab": {f"tok{i}": i for i in range(200)}}}
    )
    config = canonical_json(
        {"architectures": ["NekkoTestForCausalLM"], "hidden_size": 64, "seed": str(seed)}
    )
    layers = [
        layout.put(gguf, "application/vnd.nekko.model.gguf.v1", annotations={TITLE: "model.gguf"}),
        layout.put(tokenizer, "application/json", annotations={TITLE: "tokenizer/tokenizer.json"}),
        layout.put(config, "application/json", annotations={TITLE: "config.json"}),
    ]
    empty = layout.put(b"{}", OCI_EMPTY, data="e30=")
    assert empty["digest"] == EMPTY_JSON_DIGEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT_TYPE,
        "config": empty,
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": CREATED},
    }
    return layout.put_json(manifest, OCI_MANIFEST)


# --------------------------------------------------------------------------------------------
# pushing and reading back


def skopeo_copy(
    layout_dir: str,
    tag: str,
    peer: CountingProxy | RegistryPeer,
    repo_tag: str,
    *,
    all_images: bool = False,
    fmt: str | None = None,
    creds: tuple[str, str] | None = None,
    via_proxy: bool = False,
) -> None:
    """``skopeo copy oci:DIR:TAG docker://REGISTRY/REPO:TAG`` (to the registry itself unless
    ``via_proxy``).  Raises with skopeo's output on failure."""
    from peers import require_binary

    skopeo = require_binary("skopeo")
    host = peer.host if via_proxy else getattr(peer, "registry_host", peer.host)
    cmd = [
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--retry-times",
        "2",
    ]
    if all_images:
        cmd.append("--all")
    if fmt:
        cmd += ["--format", fmt]
    else:
        cmd.append("--preserve-digests")
    if creds:
        cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    else:
        cmd.append("--dest-no-creds")
    cmd += [f"oci:{layout_dir}:{tag}", f"docker://{host}/{repo_tag}"]
    env = dict(os.environ)
    env["REGISTRY_AUTH_FILE"] = os.path.join(layout_dir, ".no-auth.json")  # never the user's
    r = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=900,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout.decode('utf-8', 'replace')}"
        )


def _get_manifest(
    peer: Any, repo: str, ref: str, creds: tuple[str, str] | None
) -> tuple[bytes, str, str]:
    resp = peer.request(
        "GET",
        f"/v2/{repo}/manifests/{ref}",
        {"Accept": MANIFEST_ACCEPT},
        creds=creds,
        direct=hasattr(peer, "registry_host"),
    )
    if resp.status != 200:
        raise RuntimeError(f"GET manifest {repo}:{ref}: {resp.status} {resp.body[:300]!r}")
    digest = "sha256:" + hashlib.sha256(resp.body).hexdigest()
    served = resp.headers.get("docker-content-digest")
    if served and served != digest:
        raise RuntimeError(f"{repo}:{ref}: Docker-Content-Digest {served} != {digest}")
    mt = resp.headers.get("content-type", "").split(";")[0].strip()
    return resp.body, digest, json.loads(resp.body).get("mediaType") or mt


def describe(
    peer: Any, repo_tag: str, *, layout: str | None = None, creds: tuple[str, str] | None = None
) -> ImageInfo:
    """Read ``REPO:TAG`` back from the registry and describe it (see :class:`ImageInfo`)."""
    repo, _, tag = repo_tag.rpartition(":")
    if creds is None:
        creds = getattr(peer, "credentials", None)
    body, digest, mt = _get_manifest(peer, repo, tag, creds)
    common = {
        "ref": repo_tag,
        "repo": repo,
        "tag": tag,
        "host": peer.host,
        "url": f"oci://{peer.host}/{repo_tag}",
        "layout": layout,
    }
    info = _describe_manifest(common, body, digest, mt)
    if mt in (OCI_INDEX, DOCKER_LIST):
        info.index_digest = digest
        for d in json.loads(body)["manifests"]:
            cbody, cdigest, cmt = _get_manifest(peer, repo, d["digest"], creds)
            sub = _describe_manifest(common, cbody, cdigest, cmt)
            p = d.get("platform") or {}
            sub.platform = "/".join(
                x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x
            )
            sub.index_digest = digest
            ann = d.get("annotations") or {}
            if ann.get("vnd.docker.reference.type") == "attestation-manifest":
                sub.attestations = []
                info.attestations.append(sub)
            else:
                info.platforms[sub.platform] = sub
    return info


def _describe_manifest(common: dict[str, Any], body: bytes, digest: str, mt: str) -> ImageInfo:
    doc = json.loads(body)
    info = ImageInfo(digest=digest, media_type=mt, manifest=body, size=len(body), **common)
    if mt in (OCI_INDEX, DOCKER_LIST):
        return info
    info.manifest_digest = digest
    cfg = doc.get("config") or {}
    info.config_digest = cfg.get("digest")
    info.config_size = cfg.get("size")
    info.config_media_type = cfg.get("mediaType")
    info.layers = [
        {k: v for k, v in d.items() if k in ("digest", "size", "mediaType", "annotations")}
        for d in doc.get("layers") or []
    ]
    info.artifact_type = doc.get("artifactType")
    for d in info.layers:
        title = (d.get("annotations") or {}).get(TITLE)
        if title:
            info.files[title] = d
    return info


def push_image(
    peer: Any,
    repo_tag: str,
    layer_sizes: Iterable[int] = (4096, 65536),
    seed: Any = 0,
    *,
    platform: str = "linux/amd64",
    shared: Iterable[tuple[int, Any]] = (),
    workdir: str | None = None,
    creds: tuple[str, str] | None = None,
    keep_layout: bool | None = None,
    compresslevel: int | None = None,
    via_proxy: bool = False,
) -> ImageInfo:
    """Build a single-platform image with one layer per ``layer_sizes`` entry (payload bytes
    from a PRNG seeded with ``seed``; ``shared`` = extra leading layers [(size, seed)] that are
    byte-identical wherever reused) and push it to ``peer`` as ``repo_tag``.

    Layers are streamed to disk (a 1 GiB image needs 1 GiB of disk in ``workdir``, default
    under the peer's workdir, but little memory).  ``keep_layout`` (default: only when the image
    is under 64 MiB) keeps the OCI layout; ``creds`` default to the peer's (alice on the auth
    registry).  Returns the :class:`ImageInfo` read back from the registry."""
    sizes = list(layer_sizes)
    shared = list(shared)
    if keep_layout is None:
        keep_layout = sum(sizes) + sum(s for s, _ in shared) < 64 * 1024 * 1024
    base = workdir or os.path.join(getattr(peer, "workdir", tempfile.gettempdir()), "images")
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix=repo_tag.replace("/", "_").replace(":", "_") + ".", dir=base)
    if creds is None:
        creds = getattr(peer, "credentials", None)
    try:
        layout = Layout(path)
        tag = repo_tag.rpartition(":")[2]
        layout.tag(
            build_image(layout, sizes, seed, platform, shared=shared, compresslevel=compresslevel),
            tag,
        )
        skopeo_copy(path, tag, peer, repo_tag, creds=creds, via_proxy=via_proxy)
        return describe(peer, repo_tag, layout=path if keep_layout else None, creds=creds)
    finally:
        if not keep_layout:
            shutil.rmtree(path, ignore_errors=True)


SHARED_LAYERS = [(48_000, "shared/base"), (20_000, "shared/runtime")]


def seed_images(peer: Any, workdir: str | None = None) -> dict[str, ImageInfo]:
    """Push the standard test images to ``peer`` and describe them.

    On an anonymous registry: ``public/single:v1`` (linux/amd64, 3 layers), ``public/multi:v1``
    (OCI index: linux/amd64, linux/arm64, linux/arm/v7 + one buildkit attestation manifest per
    platform, unknown/unknown), ``public/docker:v1`` (Docker v2 schema 2), ``public/share-a:v1``
    and ``public/share-b:v1`` (their first two layers are the same blobs), ``public/model:v1``
    (OCI artifact, ``artifactType`` :data:`MODEL_ARTIFACT_TYPE`, empty config, titled layers).
    On an auth registry (``peer.auth``): ``public/single:v1`` and ``private/single:v1``
    (pushed as alice).  Returns ``{ref: ImageInfo}``.
    """
    base = workdir or os.path.join(peer.workdir, "images")
    os.makedirs(base, exist_ok=True)
    creds = getattr(peer, "credentials", None)
    jobs: list[tuple[str, str, dict[str, Any]]] = []  # (layout dir, ref, skopeo options)

    def new_layout(name: str) -> Layout:
        d = os.path.join(base, name)
        shutil.rmtree(d, ignore_errors=True)
        return Layout(d)

    lay = new_layout("single")
    lay.tag(build_image(lay, [4_000, 200_000, 1_000], "single"), "v1")
    jobs.append((lay.path, "public/single:v1", {}))
    if getattr(peer, "auth", False):
        lay = new_layout("private-single")
        lay.tag(build_image(lay, [3_000, 90_000], "private-single"), "v1")
        jobs.append((lay.path, "private/single:v1", {}))
    else:
        lay = new_layout("multi")
        lay.tag(
            build_index(
                lay, ["linux/amd64", "linux/arm64", "linux/arm/v7"], "multi", [2_000, 30_000]
            ),
            "v1",
        )
        jobs.append((lay.path, "public/multi:v1", {"all_images": True}))

        lay = new_layout("docker")
        lay.tag(build_image(lay, [5_000, 40_000], "docker"), "v1")
        jobs.append((lay.path, "public/docker:v1", {"fmt": "v2s2"}))

        for name in ("share-a", "share-b"):
            lay = new_layout(name)
            lay.tag(build_image(lay, [10_000], name, shared=SHARED_LAYERS), "v1")
            jobs.append((lay.path, f"public/{name}:v1", {}))

        lay = new_layout("model")
        lay.tag(build_model_artifact(lay, "model"), "v1")
        jobs.append((lay.path, "public/model:v1", {}))

    def push(job: tuple[str, str, dict[str, Any]]) -> ImageInfo:
        path, ref, opts = job
        skopeo_copy(path, "v1", peer, ref, creds=creds, **opts)
        return describe(peer, ref, layout=path, creds=creds)

    with ThreadPoolExecutor(max_workers=3) as pool:
        infos = list(pool.map(push, jobs))
    return {info.ref: info for info in infos}


# --------------------------------------------------------------------------------------------
# pushing hand-made manifests over the distribution API (no skopeo: any bytes a registry takes)


def push_blob(
    peer: Any, repo: str, data: bytes, media_type: str = "application/octet-stream", **extra: Any
) -> dict[str, Any]:
    """Upload ``data`` to ``repo`` on ``peer`` (POST, then PUT with the digest); its descriptor."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if peer.request("HEAD", f"/v2/{repo}/blobs/{digest}", direct=True).status != 200:
        r = peer.request(
            "POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"}, b"", direct=True
        )
        if r.status != 202:
            raise RuntimeError(f"POST upload {repo}: {r.status} {r.body[:300]!r}")
        location = r.headers["location"]
        path = (
            location.split("://", 1)[-1].split("/", 1)[-1]
            if "://" in location
            else location.lstrip("/")
        )
        sep = "&" if "?" in path else "?"
        r = peer.request(
            "PUT",
            f"/{path}{sep}digest={digest}",
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
            data,
            direct=True,
        )
        if r.status != 201:
            raise RuntimeError(f"PUT blob {repo}: {r.status} {r.body[:300]!r}")
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def push_manifest(peer: Any, repo: str, ref: str, doc: Any) -> dict[str, Any]:
    """PUT manifest (or index) ``doc`` as ``repo:ref``; its descriptor (media type, digest,
    size of the bytes as sent)."""
    body = canonical_json(doc)
    mt = doc["mediaType"]
    r = peer.request(
        "PUT",
        f"/v2/{repo}/manifests/{ref}",
        {"Content-Type": mt, "Content-Length": str(len(body))},
        body,
        direct=True,
    )
    if r.status != 201:
        raise RuntimeError(f"PUT manifest {repo}:{ref}: {r.status} {r.body[:300]!r}")
    return {
        "mediaType": mt,
        "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
        "size": len(body),
    }


def artifact_manifest(
    peer: Any, repo: str, layers: list[dict[str, Any]], artifact_type: str = MODEL_ARTIFACT_TYPE
) -> dict[str, Any]:
    """An OCI artifact manifest (empty config, pushed) over ``layers`` (pushed descriptors)."""
    config = push_blob(peer, repo, b"{}", OCI_EMPTY)
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config,
        "layers": layers,
    }
