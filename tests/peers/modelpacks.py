"""Models packaged the way their producers package them, for tests.

modctl, ``docker model package``, ``kit pack`` and ``ollama create``/``push`` are not installable
here, so these builders write what they write, from their specs and their source (see
docs/model-formats.md): the same media types, annotations, config documents, layer order, tar
entry names and header fields, and JSON laid out as Go's ``encoding/json`` lays it out (struct
field order, sorted map keys, ``<>&`` escaped).  Plus an ORAS artifact with a directory layer,
a KServe-style modelcar image with whiteouts, and hostile tars.

Each builder returns a :class:`Pack`: the manifest bytes and media type, every blob, and what a
correct view holds (``view``: name -> bytes) and which file is ``model``.  :func:`push_pack`
puts a pack into a real registry (tests/peers/registry.py) with the distribution API's
monolithic upload, byte for byte.

Tiny files an engine can open: :func:`gguf_bytes` (a valid GGUF v3 header with metadata;
:func:`parse_gguf` reads it back) and :func:`safetensors_bytes` (8-byte header length, JSON
header, data; :func:`parse_safetensors` reads it back).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TITLE = "org.opencontainers.image.title"
CREATED = "2025-06-01T12:00:00Z"
FIXED_MTIME = 1748779200  # CREATED as epoch seconds


# --------------------------------------------------------------------------------------------
# JSON as Go writes it


def go_json(obj: Any, newline: bool = False) -> bytes:
    """``json.Marshal``: compact, map keys sorted (callers give structs in field order),
    ``<``, ``>`` and ``&`` escaped; ``json.Encoder.Encode`` adds a newline."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode() + (b"\n" if newline else b"")


def _sorted(d: dict) -> dict:
    return {k: d[k] for k in sorted(d)}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# files an engine can open


_GGUF_U16, _GGUF_U32, _GGUF_I32, _GGUF_STR, _GGUF_ARR, _GGUF_U64 = 2, 4, 5, 8, 9, 10


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v: Any) -> tuple[int, bytes]:
    if isinstance(v, str):
        return _GGUF_STR, _gguf_str(v)
    if isinstance(v, tuple) and v[0] == "u16":
        return _GGUF_U16, struct.pack("<H", v[1])
    if isinstance(v, tuple) and v[0] == "i32":
        return _GGUF_I32, struct.pack("<i", v[1])
    if isinstance(v, int):
        return _GGUF_U32, struct.pack("<I", v)
    if isinstance(v, list):
        return _GGUF_ARR, struct.pack("<IQ", _GGUF_STR, len(v)) + b"".join(_gguf_str(x) for x in v)
    raise TypeError(v)


def gguf_bytes(
    name: str = "nekko-test",
    arch: str = "llama",
    payload: bytes = b"",
    split: tuple[int, int] | None = None,
    **kv: Any,
) -> bytes:
    """A GGUF v3 file: magic, version, tensor count 0, metadata (``general.architecture``,
    ``general.name``, llama.cpp's ``split.no``/``split.count`` for a shard of ``split``), then
    ``payload`` where tensor data would go."""
    meta: dict[str, Any] = {"general.architecture": arch, "general.name": name}
    if split is not None:
        meta["split.no"] = ("u16", split[0])
        meta["split.count"] = ("u16", split[1])
        meta["split.tensors.count"] = ("i32", 0)
    meta.update(kv)
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(meta))]
    for k, v in meta.items():
        t, b = _gguf_value(v)
        out += [_gguf_str(k), struct.pack("<I", t), b]
    head = b"".join(out)
    head += b"\0" * (-len(head) % 32)  # general.alignment: tensor data starts aligned
    return head + payload


def parse_gguf(data: bytes) -> dict:
    """What llama.cpp reads first: magic, version, tensor count and the metadata."""
    if data[:4] != b"GGUF":
        raise ValueError(f"not GGUF: {data[:4]!r}")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24
    kv: dict[str, Any] = {}

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        s = data[pos : pos + n].decode()
        pos += n
        return s

    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if t == _GGUF_STR:
            kv[key] = string()
        elif t in (_GGUF_U32, _GGUF_I32):
            (kv[key],) = struct.unpack_from("<I" if t == _GGUF_U32 else "<i", data, pos)
            pos += 4
        elif t == _GGUF_U16:
            (kv[key],) = struct.unpack_from("<H", data, pos)
            pos += 2
        elif t == _GGUF_ARR:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            assert et == _GGUF_STR
            kv[key] = [string() for _ in range(n)]
        else:
            raise ValueError(f"GGUF value type {t} not handled here")
    return {"version": version, "tensor_count": n_tensors, "kv": kv}


def safetensors_bytes(tensors: dict[str, list[float]], metadata: dict | None = None) -> bytes:
    """A safetensors file of F32 tensors: u64 header length, JSON header, little-endian data."""
    header: dict[str, Any] = {}
    data = b""
    for name, values in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": [len(values)],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def parse_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    for name, t in header.items():
        if name != "__metadata__":
            start, end = t["data_offsets"]
            assert 0 <= start <= end and 8 + n + end <= len(data), name
    return header


def hf_like_model(seed: str = "m", shards: int = 2) -> dict[str, bytes]:
    """A transformers-style directory: config.json, tokenizer files, sharded safetensors."""
    files = {
        "config.json": json.dumps(
            {"architectures": ["NekkoForCausalLM"], "hidden_size": 4, "seed": seed}
        ).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"bos_token": "<s>"}',
    }
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        files[name] = safetensors_bytes(
            {f"w{i}": [float(i), 0.5, -1.0, 2.0]}, {"format": "pt", "seed": seed}
        )
        index["weight_map"][f"w{i}"] = name  # type: ignore[index]
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


# --------------------------------------------------------------------------------------------
# tars as Go's archive/tar writes them


@dataclass
class Entry:
    """One tar member.  ``type``: ``file``, ``dir``, ``symlink``, ``hardlink``, ``chr``,
    ``blk``, ``fifo``; ``raw_name`` (bytes) bypasses name encoding (hostile tests)."""

    name: str
    data: bytes = b""
    type: str = "file"
    mode: int | None = None
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME
    raw_name: bytes | None = None


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(entries: list[Entry]) -> bytes:
    """A tar as ``tar.Writer`` writes it: USTAR headers (PAX records only for what USTAR cannot
    hold), data padded to 512, two zero blocks at the end and no padding to a 10 KiB record
    (Python's tarfile pads; Go's writer does not)."""
    out = io.BytesIO()
    for e in entries:
        ti = tarfile.TarInfo(e.name)
        ti.type = _TYPES[e.type]
        ti.mode = e.mode if e.mode is not None else (0o755 if e.type == "dir" else 0o644)
        ti.uid, ti.gid, ti.uname, ti.gname = e.uid, e.gid, "", ""
        ti.mtime = e.mtime
        ti.linkname = e.linkname
        ti.size = len(e.data) if e.type == "file" else 0
        if e.type in ("chr", "blk"):
            ti.devmajor, ti.devminor = 1, 3
        if e.raw_name is not None:  # bytes as they are in the name field: a one-block header
            ti.name = "x"
            buf = bytearray(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            assert len(buf) == 512 and len(e.raw_name) <= 100
            buf[0:100] = e.raw_name.ljust(100, b"\0")
            buf[148:156] = b" " * 8
            buf[148:156] = b"%06o\0 " % sum(buf)
            header = bytes(buf)
        else:
            header = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out.write(header)
        if ti.size:
            out.write(e.data)
            out.write(b"\0" * (-len(e.data) % 512))
    out.write(b"\0" * 1024)
    return out.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """gzip as Go's ``gzip.NewWriter`` writes it: no name, mtime 0, OS unknown (255)."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def only_gguf(view: dict[str, bytes]) -> str | None:
    """The expected ``model`` of a test view: its one unsplit .gguf weights file, if any."""
    found = [n for n in view if n.endswith(".gguf") and "proj" not in n]
    return found[0] if len(found) == 1 else None


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


# --------------------------------------------------------------------------------------------
# packs


@dataclass
class Pack:
    """What a producer pushes, and what a correct view of it holds."""

    producer: str
    format: str
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes]
    view: dict[str, bytes]
    model: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> dict:
        return json.loads(self.manifest)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def config(self) -> bytes:
        return self.blobs[self.doc["config"]["digest"]]

    def layer(self, digest: str) -> bytes:
        return self.blobs[digest]


def _oci_desc(media_type: str, blob: bytes, annotations: dict | None = None, **extra: Any) -> dict:
    """An ``ocispec.Descriptor`` in its field order: mediaType, digest, size, annotations,
    data, artifactType."""
    d: dict[str, Any] = {"mediaType": media_type, "digest": sha256(blob), "size": len(blob)}
    if annotations:
        d["annotations"] = _sorted(annotations)
    d.update(extra)
    return d


def _ggcr_desc(media_type: str, data: bytes, annotations: dict | None = None) -> dict:
    """go-containerregistry's ``v1.Descriptor`` (Docker Model Runner): mediaType, size, digest,
    annotations."""
    d: dict[str, Any] = {"mediaType": media_type, "size": len(data), "digest": sha256(data)}
    if annotations:
        d["annotations"] = _sorted(annotations)
    return d


def _file_metadata(name: str, size: int, mode: int = 0o644) -> str:
    """``org.cncf.model.file.metadata+json``: the FileMetadata struct in field order."""
    return go_json(
        {
            "name": posixpath.basename(name),
            "mode": mode,
            "uid": 0,
            "gid": 0,
            "size": size,
            "mtime": "2025-06-01T12:00:00Z",
            "typeflag": 0,
        }
    ).decode()


def _modctl_kind(path: str) -> str:
    """Which of modctl's Modelfile sections (CONFIG, MODEL, CODE, DOC) a file falls in by
    default, hence its layer media type (``weight.config``, ``weight``, ``code``, ``doc``)."""
    base = posixpath.basename(path).lower()
    if base.endswith((".safetensors", ".gguf", ".bin", ".pt", ".onnx")):
        return "weight"
    if base.endswith(".py"):
        return "code"
    if base.endswith(".md") or base.startswith("license"):
        return "doc"
    return "weight.config"


def modctl(
    files: dict[str, bytes], raw: bool = False, gzip_layers: bool = False, legacy: bool = False
) -> Pack:
    """``modctl build``: one layer per file; config files first, then weights, code, docs.
    A tar layer holds ONE entry named by the path relative to the workspace (no directory
    entries for its parents); ``--raw`` makes it the file itself.  Every layer carries
    ``org.cncf.model.filepath`` and ``org.cncf.model.file.metadata+json``; the manifest
    carries the Modelfile as ``org.cncf.modctl.modelfile``.  ``legacy``: the older
    ``vnd.cnai`` types and ``org.cnai.model.filepath`` (dragonflyoss/model-spec)."""
    ns = "cnai" if legacy else "cncf"
    order = {"weight.config": 0, "weight": 1, "code": 2, "doc": 3}
    blobs: dict[str, bytes] = {}
    layers = []
    diff_ids = []
    for path in sorted(files, key=lambda p: (order[_modctl_kind(p)], p)):
        data = files[path]
        kind = _modctl_kind(path)
        if raw:
            blob, suffix = data, "raw"
        else:
            blob = tar_bytes([Entry(path, data, mtime=FIXED_MTIME, uid=1000, gid=1000)])
            suffix = "tar"
        diff_ids.append(sha256(blob))
        if gzip_layers and not raw:
            blob, suffix = gzip_bytes(blob), "tar+gzip"
        ann = {f"org.{ns}.model.filepath": path}
        if not legacy:
            ann["org.cncf.model.file.metadata+json"] = _file_metadata(path, len(data))
        mt = (
            f"application/vnd.{ns}.model.{kind}.v1.{suffix}"
            if not legacy
            else f"application/vnd.cnai.model.layer.v1.{suffix}"
        )
        layers.append(_oci_desc(mt, blob, ann))
        blobs[sha256(blob)] = blob
    config = go_json(
        {
            "descriptor": {"createdAt": CREATED, "name": "nekko-test", "version": "1"},
            "modelfs": {"type": "layers", "diffIds": diff_ids},
            "config": {"format": "safetensors", "paramSize": "1M", "precision": "float32"},
        }
    )
    blobs[sha256(config)] = config
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": f"application/vnd.{ns}.model.manifest.v1+json",
        "config": _oci_desc(f"application/vnd.{ns}.model.config.v1+json", config),
        "layers": layers,
    }
    if not legacy:
        manifest["annotations"] = {
            "org.cncf.modctl.modelfile": "# Generated at 2025-06-01\nNAME nekko-test\n"
        }
    return Pack(
        "modctl", "modelpack", go_json(manifest), OCI_MANIFEST, blobs, dict(files), only_gguf(files)
    )


def docker_model_v01(
    shards: list[bytes],
    license: bytes | None = b"MIT License\n",
    mmproj: bytes | None = None,
    template: bytes | None = None,
    dir_tar: tuple[str, dict[str, bytes]] | None = None,
    shard_names: list[str] | None = None,
) -> Pack:
    """``docker model package --gguf FIRST_SHARD [--license] [--mmproj] [--chat-template]
    [--dir-tar DIR]`` (config v0.1): one raw layer per GGUF shard, in shard order, then the
    license, projector and template; current builders also annotate every layer with
    ``org.cncf.model.filepath`` (the file's base name), file metadata and
    ``org.cncf.model.file.mediatype.untested: false``.  A ``--dir-tar`` layer is a plain tar
    whose entries start with the directory's base name (paths relative to its parent).
    Docker Model Runner names the files by type and order, whatever the annotations say."""
    names = shard_names or (
        ["model.gguf"]
        if len(shards) == 1
        else [f"Nekko-Q4-{i + 1:05d}-of-{len(shards):05d}.gguf" for i in range(len(shards))]
    )
    parts: list[tuple[str, bytes, str]] = [
        (names[i], s, "application/vnd.docker.ai.gguf.v3") for i, s in enumerate(shards)
    ]
    if license is not None:
        parts.append(("LICENSE.txt", license, "application/vnd.docker.ai.license"))
    if mmproj is not None:
        parts.append(("mmproj-f16.gguf", mmproj, "application/vnd.docker.ai.mmproj"))
    if template is not None:
        parts.append(("chat.jinja", template, "application/vnd.docker.ai.chat.template.jinja"))
    blobs: dict[str, bytes] = {}
    layers = []
    for name, data, mt in parts:
        layers.append(_docker_layer(name, data, mt))
        blobs[sha256(data)] = data
    view: dict[str, bytes] = {}
    if len(shards) == 1:
        view["model.gguf"] = shards[0]
    else:
        for i, s in enumerate(shards):
            view[f"model-{i + 1:05d}-of-{len(shards):05d}.gguf"] = s
    if license is not None:
        view["LICENSE"] = license
    if mmproj is not None:
        view["model.mmproj"] = mmproj
    if template is not None:
        view["template.jinja"] = template
    if dir_tar is not None:
        dirname, dfiles = dir_tar
        entries = [Entry(dirname, type="dir")]
        for p in sorted(dfiles):
            for parent in _parents(p):
                if Entry(f"{dirname}/{parent}", type="dir") not in entries:
                    entries.append(Entry(f"{dirname}/{parent}", type="dir"))
            entries.append(Entry(f"{dirname}/{p}", dfiles[p]))
            view[f"{dirname}/{p}"] = dfiles[p]
        blob = tar_bytes(entries)
        layers.append(_docker_layer("dir-tar-123.tar", blob, "application/vnd.docker.ai.dir.tar"))
        blobs[sha256(blob)] = blob
    model = "model.gguf" if len(shards) == 1 else f"model-00001-of-{len(shards):05d}.gguf"
    return _docker_pack(
        "docker-model-v0.1",
        "v0.1",
        {
            "format": "gguf",
            "quantization": "Q4_0",
            "parameters": "1M",
            "architecture": "llama",
            "size": str(sum(len(s) for s in shards)),
            "gguf": {"general.architecture": "llama"},
        },
        layers,
        blobs,
        view,
        model,
    )


def _docker_layer(name: str, data: bytes, media_type: str) -> dict:
    """A layer as Docker Model Runner's ``partial.NewLayer`` describes it."""
    return _ggcr_desc(
        media_type,
        data,
        {
            "org.cncf.model.filepath": name,
            "org.cncf.model.file.metadata+json": _file_metadata(name, len(data)),
            "org.cncf.model.file.mediatype.untested": "false",
        },
    )


def _docker_pack(
    producer: str,
    version: str,
    config: dict,
    layers: list,
    blobs: dict,
    view: dict,
    model: str | None,
) -> Pack:
    """The config (``config``, ``descriptor``, ``rootfs`` of type "rootfs") and manifest."""
    body = go_json(
        {
            "config": config,
            "descriptor": {"created": CREATED},
            "rootfs": {"type": "rootfs", "diff_ids": [d["digest"] for d in layers]},
        }
    )
    blobs[sha256(body)] = body
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _ggcr_desc(f"application/vnd.docker.ai.model.config.{version}+json", body),
        "layers": layers,
    }
    return Pack(producer, "docker-model", go_json(manifest), OCI_MANIFEST, blobs, view, model)


def _docker_type(path: str) -> str:
    base = posixpath.basename(path).lower()
    if base.endswith(".gguf"):
        return "application/vnd.docker.ai.gguf.v3"
    if base.endswith(".safetensors"):
        return "application/vnd.docker.ai.safetensors"
    if base.startswith("license"):
        return "application/vnd.docker.ai.license"
    if base.endswith(".jinja"):
        return "application/vnd.docker.ai.chat.template.jinja"
    return "application/vnd.docker.ai.model.file"


def docker_model_v02(files: dict[str, bytes]) -> Pack:
    """``docker model package --safetensors-dir DIR`` (config v0.2, ``builder.FromDirectory``):
    every non-hidden file of the directory, walked in lexical order, is one raw layer carrying
    its relative path in ``org.cncf.model.filepath``."""
    blobs: dict[str, bytes] = {}
    layers = []
    for path in sorted(files):
        layers.append(_docker_layer(path, files[path], _docker_type(path)))
        blobs[sha256(files[path])] = files[path]
    return _docker_pack(
        "docker-model-v0.2",
        "v0.2",
        {
            "format": "safetensors",
            "architecture": "llama",
            "size": "1M",
            "safetensors": {"tensors": "2"},
        },
        layers,
        blobs,
        dict(files),
        only_gguf(files),
    )


def kitops(
    context: dict[str, bytes], kitfile: dict, gzip_layers: bool = False, old: bool = False
) -> Pack:
    """``kit pack``: the config is the Kitfile as JSON (``application/vnd.kitops.modelkit.
    config.v1+json``), each element recording its layer's ``digest`` and ``diffId``; one tar
    layer per element in the order model, model parts, code, datasets, docs.  A layer's tar
    walks the context directory: the layer path's parent directories, the path and everything
    under it, named relative to the context, uid 1000, gid 0, no user/group names, mtime 0.
    The manifest has no ``mediaType`` field and the annotation
    ``ml.kitops.modelkit.cli-version``.  ``old``: a ModelKit from before layer digests were
    recorded, whose tars hold paths relative to the layer path's parent."""
    compression = "+gzip" if gzip_layers else ""
    kf = json.loads(json.dumps(kitfile))
    elements: list[tuple[str, dict]] = []
    model = kf.get("model")
    if model:
        if model.get("path"):
            elements.append(("model", model))
        elements += [("modelpart", p) for p in model.get("parts", [])]
    elements += [("code", c) for c in kf.get("code", [])]
    elements += [("dataset", d) for d in kf.get("datasets", [])]
    elements += [("docs", d) for d in kf.get("docs", [])]
    claimed = [posixpath.normpath(e["path"]) for _, e in elements]
    blobs: dict[str, bytes] = {}
    layers = []
    view: dict[str, bytes] = {}
    for kind, element in elements:
        base = posixpath.normpath(element["path"])
        others = [c for c in claimed if c != base]
        entries = []
        dirs: set[str] = set()
        for path in sorted(context):
            if not (path == base or path.startswith(base + "/")):
                continue
            if any(path == o or path.startswith(o + "/") for o in others if o.startswith(base)):
                continue  # another layer's
            for parent in _parents(path):
                if parent not in dirs:
                    dirs.add(parent)
                    entries.append(parent)
            entries.append(path)
        tar_entries = []
        for name in entries:
            shown = name
            if old:
                parent = posixpath.dirname(base)
                if parent and not (name == parent or name.startswith(parent + "/")):
                    continue
                shown = name[len(parent) + 1 :] if parent else name
                if not shown:
                    continue
            if name in context:
                tar_entries.append(Entry(shown, context[name], uid=1000, gid=0, mtime=0))
                view[name] = context[name]
            else:
                tar_entries.append(Entry(shown, type="dir", uid=1000, gid=0, mtime=0))
        tar = tar_bytes(tar_entries)
        blob = gzip_bytes(tar, 1) if gzip_layers else tar
        blobs[sha256(blob)] = blob
        layers.append(
            _oci_desc(f"application/vnd.kitops.modelkit.{kind}.v1.tar{compression}", blob)
        )
        if not old:
            element["digest"] = sha256(blob)
            element["diffId"] = sha256(tar)
    config = go_json(kf)
    blobs[sha256(config)] = config
    manifest = {
        "schemaVersion": 2,
        "config": _oci_desc("application/vnd.kitops.modelkit.config.v1+json", config),
        "layers": layers,
        "annotations": {"ml.kitops.modelkit.cli-version": "1.7.0"},
    }
    return Pack(
        "kit" + ("-old" if old else ""),
        "kitops",
        go_json(manifest),
        OCI_MANIFEST,
        blobs,
        view,
        only_gguf(view),
    )


def ollama(
    model: bytes,
    projector: bytes | None = None,
    template: bytes = b"{{ .Prompt }}",
    system: bytes | None = b"You are a test.",
    params: dict | None = None,
    license: bytes | None = b"Apache-2.0\n",
) -> Pack:
    """``ollama create`` + ``push``: a Docker v2 manifest (``json.Marshal``, pushed as
    ``application/vnd.docker.distribution.manifest.v2+json``), config
    ``application/vnd.docker.container.image.v1+json`` holding Ollama's ConfigV2 (written
    with ``json.Encoder``: a trailing newline), one raw layer per role, in ollama's order."""
    parts: list[tuple[str, bytes, str]] = [("model", model, "model.gguf")]
    if projector is not None:
        parts.append(("projector", projector, "projector.gguf"))
    parts.append(("template", template, "template"))
    if system is not None:
        parts.append(("system", system, "system"))
    if license is not None:
        parts.append(("license", license, "license"))
    parts.append(("params", go_json(params or {"stop": ["<|end|>"]}), "params"))
    blobs: dict[str, bytes] = {}
    layers = []
    view = {}
    for role, data, name in parts:
        layers.append(
            {
                "mediaType": f"application/vnd.ollama.image.{role}",
                "digest": sha256(data),
                "size": len(data),
            }
        )
        blobs[sha256(data)] = data
        view[name] = data
    config = go_json(
        {
            "model_format": "gguf",
            "model_family": "llama",
            "model_families": ["llama"],
            "model_type": "1M",
            "file_type": "Q4_0",
            "architecture": "amd64",
            "os": "linux",
        },
        newline=True,
    )
    blobs[sha256(config)] = config
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": layers,
    }
    return Pack("ollama", "ollama", go_json(manifest), DOCKER_MANIFEST, blobs, view, "model.gguf")


def oras_directory(
    title: str,
    files: dict[str, bytes],
    extra: dict[str, bytes] | None = None,
    links: dict[str, str] | None = None,
) -> Pack:
    """``oras push REG/REPO:TAG DIR FILE…``: a directory becomes a tar+gzip layer whose entries
    start with the directory's name (the title), uid/gid 0, no user/group names, symlinks kept
    as links, annotated ``io.deis.oras.content.unpack: "true"`` and
    ``io.deis.oras.content.digest`` (the digest of the uncompressed tar); a file becomes a raw
    layer labelled ``application/vnd.oci.image.layer.v1.tar`` with only its title.  Config:
    the empty descriptor; ``artifactType`` ``application/vnd.unknown.artifact.v1``."""
    entries = [Entry(title, type="dir")]
    seen: set[str] = set()
    view: dict[str, bytes] = {}
    for path in sorted(files):
        for parent in _parents(path):
            if parent not in seen:
                seen.add(parent)
                entries.append(Entry(f"{title}/{parent}", type="dir"))
        entries.append(Entry(f"{title}/{path}", files[path]))
        view[f"{title}/{path}"] = files[path]
    for path, target in sorted((links or {}).items()):
        entries.append(Entry(f"{title}/{path}", type="symlink", linkname=target))
        view[f"{title}/{path}"] = files[
            posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        ]
    tar = tar_bytes(entries)
    blob = gzip_bytes(tar)
    blobs = {sha256(blob): blob}
    layers = [
        _oci_desc(
            OCI_LAYER_GZIP,
            blob,
            {
                "io.deis.oras.content.digest": sha256(tar),
                "io.deis.oras.content.unpack": "true",
                TITLE: title,
            },
        )
    ]
    for name, data in sorted((extra or {}).items()):
        layers.append(_oci_desc(OCI_LAYER, data, {TITLE: name}))
        blobs[sha256(data)] = data
        view[name] = data
    empty = b"{}"
    blobs[sha256(empty)] = empty
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.unknown.artifact.v1",
        "config": _oci_desc(OCI_EMPTY, empty, data="e30="),
        "layers": layers,
        "annotations": {"org.opencontainers.image.created": CREATED},
    }
    return Pack("oras", "artifact", go_json(manifest), OCI_MANIFEST, blobs, view, only_gguf(view))


def image(
    layers: list[list[Entry]],
    view: dict[str, bytes],
    model: str | None = None,
    docker: bool = False,
) -> Pack:
    """An image as buildkit writes it: tar+gzip layers (entries without a leading ``./``),
    an image config with ``rootfs.diff_ids`` and history, OCI (or Docker v2) media types."""
    blobs: dict[str, bytes] = {}
    descs = []
    diff_ids = []
    for entries in layers:
        tar = tar_bytes(entries)
        blob = gzip_bytes(tar)
        blobs[sha256(blob)] = blob
        diff_ids.append(sha256(tar))
        mt = "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else OCI_LAYER_GZIP
        descs.append(_oci_desc(mt, blob))
    config = go_json(
        {
            "architecture": "amd64",
            "created": CREATED,
            "os": "linux",
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": CREATED, "created_by": f"layer {i}"} for i in range(len(layers))
            ],
        }
    )
    blobs[sha256(config)] = config
    mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": _oci_desc(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": descs,
    }
    return Pack("image", "image", go_json(manifest), mt, blobs, view, model)


def modelcar(files: dict[str, bytes] | None = None) -> Pack:
    """A KServe modelcar (``FROM busybox`` + ``COPY`` the model to ``/models``, then a layer that
    deletes a stale file with a whiteout and replaces a directory with an opaque whiteout):
    the view is ``/models`` as the image's file system has it after all three layers."""
    files = files or hf_like_model("car", 1)
    base = [
        Entry("bin", type="dir"),
        Entry("bin/busybox", b"\x7fELF busybox", mode=0o755),
        Entry("bin/sh", type="hardlink", linkname="bin/busybox"),
        Entry("etc", type="dir"),
        Entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        Entry("dev", type="dir"),
        Entry("dev/null", type="chr", mode=0o666),
        Entry("models", type="dir"),
        Entry("models/stale.bin", b"old weights"),
        Entry("models/cache", type="dir"),
        Entry("models/cache/old.json", b"{}"),
    ]
    model = [Entry("models", type="dir")]
    for path in sorted(files):
        for parent in _parents(path):
            model.append(Entry(f"models/{parent}", type="dir"))
        model.append(Entry(f"models/{path}", files[path]))
    model.append(Entry("models/current", type="symlink", linkname="config.json"))
    top = [
        Entry("models", type="dir"),
        Entry("models/.wh.stale.bin"),
        Entry("models/cache", type="dir"),
        Entry("models/cache/.wh..wh..opq"),
        Entry("models/cache/new.json", b'{"new": true}'),
    ]
    view = dict(files)
    view["current"] = files["config.json"]
    view["cache/new.json"] = b'{"new": true}'
    pack = image([base, model, top], view, only_gguf(view))
    pack.producer = "modelcar"
    return pack


# --------------------------------------------------------------------------------------------
# hostile tars


# Tar layers a model must not be unpacked from, by what each tries.
HOSTILE: dict[str, list[Entry]] = {
    "absolute path": [Entry("/etc/passwd", b"root::0:0::/:/bin/sh\n")],
    "dot-dot": [Entry("../escape", b"x")],
    "dot-dot inside": [Entry("a/../../escape", b"x")],
    "symlink to /etc/passwd": [Entry("passwd", type="symlink", linkname="/etc/passwd")],
    "symlink up and out": [
        Entry("sub", type="dir"),
        Entry("sub/p", type="symlink", linkname="../../etc/passwd"),
    ],
    "hard link to /etc/passwd": [Entry("p", type="hardlink", linkname="/etc/passwd")],
    "hard link to nothing": [Entry("p", type="hardlink", linkname="missing")],
    "character device": [Entry("null", type="chr")],
    "block device": [Entry("sda", type="blk")],
    "fifo": [Entry("pipe", type="fifo")],
    "duplicate": [Entry("model.bin", b"1"), Entry("model.bin", b"2")],
    "overlong component": [Entry("a" * 256, b"x")],
    "overlong path": [Entry("/".join(["d" * 200] * 21), b"x")],
    "too deep": [Entry("/".join(["d"] * 300), b"x")],
    "not UTF-8": [Entry("", b"x", raw_name=b"caf\xe9.bin")],
    "file and directory": [Entry("a", b"file"), Entry("a/b", b"under a file")],
    "directory then file": [Entry("a/b", b"x"), Entry("a", b"file")],
    "file under a link": [
        Entry("sub", type="dir"),
        Entry("d", type="symlink", linkname="sub"),
        Entry("d/x", b"written through a link"),
    ],
    "dangling link": [Entry("l", type="symlink", linkname="nothing")],
    "link loop": [
        Entry("a", type="symlink", linkname="b"),
        Entry("b", type="symlink", linkname="a"),
    ],
    "link to its own directory": [
        Entry("d", type="dir"),
        Entry("d/x", b"x"),
        Entry("d/self", type="symlink", linkname="."),
    ],
    "control character": [Entry("bad\nname", b"x")],
}


def replace_layer(pack: Pack, index: int, blob: bytes, media_type: str, annotations: dict) -> Pack:
    """``pack`` with only its layer ``index``, and that replaced by ``blob`` (a hostile tar):
    its view is unknown (empty)."""
    doc = pack.doc
    doc["layers"] = [d for i, d in enumerate(doc["layers"]) if i == index]
    doc["layers"][0] = {
        "mediaType": media_type,
        "digest": sha256(blob),
        "size": len(blob),
        "annotations": annotations,
    }
    blobs = {doc["config"]["digest"]: pack.config, sha256(blob): blob}
    return Pack(pack.producer, pack.format, go_json(doc), pack.media_type, blobs, {})


# --------------------------------------------------------------------------------------------
# pushing


def push_pack(peer: Any, repo_tag: str, pack: Pack, creds: tuple[str, str] | None = None) -> str:
    """Push ``pack`` to ``peer``'s registry as ``REPO:TAG`` (blobs by monolithic upload, then
    the manifest byte for byte with the producer's Content-Type).  Returns ``oci://`` URL."""
    repo, _, tag = repo_tag.rpartition(":")
    if creds is None:
        creds = getattr(peer, "credentials", None)
    token_server = getattr(peer, "token_server", None)
    if creds and token_server is not None:  # a token up front: a big body is sent once
        from peers.tokenserver import fetch_token

        token = fetch_token(
            token_server.realm, peer.service, [f"repository:{repo}:pull,push"], creds
        )
        request = peer.request

        def with_token(*args: Any, **kw: Any) -> Any:
            return request(*args, **{**kw, "token": token})

        peer = _Calls(peer, with_token)
    for digest, data in pack.blobs.items():
        head = peer.request("HEAD", f"/v2/{repo}/blobs/{digest}", creds=creds, direct=True)
        if head.status == 200:
            continue
        start = peer.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            {"Content-Length": "0"},
            b"",
            creds=creds,
            direct=True,
        )
        if start.status != 202:
            raise RuntimeError(f"POST upload {repo}: {start.status} {start.body[:300]!r}")
        loc = urlsplit(start.headers["location"])
        sep = "&" if loc.query else "?"
        path = (
            f"{loc.path}?{loc.query}{sep}digest={digest}"
            if loc.query
            else f"{loc.path}?digest={digest}"
        )
        put = peer.request(
            "PUT",
            path,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
            data,
            creds=creds,
            direct=True,
        )
        if put.status != 201:
            raise RuntimeError(f"PUT blob {digest}: {put.status} {put.body[:300]!r}")
    put = peer.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        {"Content-Type": pack.media_type, "Content-Length": str(len(pack.manifest))},
        pack.manifest,
        creds=creds,
        direct=True,
    )
    if put.status != 201:
        raise RuntimeError(f"PUT manifest {repo_tag}: {put.status} {put.body[:300]!r}")
    served = put.headers.get("docker-content-digest")
    if served and served != pack.digest:
        raise RuntimeError(f"{repo_tag}: the registry says {served}, we pushed {pack.digest}")
    return f"oci://{peer.host}/{repo_tag}"


class _Calls:
    """``peer`` with its ``request`` replaced."""

    def __init__(self, peer: Any, request: Any) -> None:
        self.host = peer.host
        self.request = request


def standard_packs() -> dict[str, Pack]:
    """One pack per producer and format, small enough to push in a second."""
    hf = hf_like_model("std", 2)
    one = gguf_bytes("one", payload=b"\x01" * 64)
    shards = [gguf_bytes("split", payload=bytes([i]) * 40, split=(i, 3)) for i in range(3)]
    return {
        "modctl": modctl({**hf, "README.md": b"# test\n", "LICENSE": b"MIT\n"}),
        "modctl-raw": modctl({"model.gguf": one, "config.json": b"{}"}, raw=True),
        "modctl-legacy": modctl({"model.gguf": one}, legacy=True),
        "docker-v01": docker_model_v01([one], template=b"{{ messages }}"),
        "docker-v01-split": docker_model_v01(shards, mmproj=gguf_bytes("proj", "clip")),
        "docker-v02": docker_model_v02({**hf, "LICENSE": b"MIT\n", "sub/extra.json": b"{}"}),
        "kitops": kitops(
            {
                "Kitfile": b"x",
                "models/m.gguf": one,
                "src/run.py": b"print(1)\n",
                "README.md": b"# kit\n",
            },
            {
                "manifestVersion": "1.0.0",
                "package": {"name": "test"},
                "model": {"name": "m", "path": "models/m.gguf"},
                "code": [{"path": "src"}],
                "docs": [{"path": "README.md"}],
            },
        ),
        "ollama": ollama(one, projector=gguf_bytes("proj", "clip")),
        "oras": oras_directory(
            "weights",
            {"a.bin": b"A" * 100, "sub/b.bin": b"B" * 10},
            {"README.md": b"# oras\n"},
            links={"latest.bin": "a.bin"},
        ),
        "modelcar": modelcar(),
    }
