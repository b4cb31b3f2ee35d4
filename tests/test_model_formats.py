"""Model packagings: recognised, named as their tools name them, unpacked into one blob per
file, hostile tars refused (DESIGN section 8).

The packs are built the way modctl, ``docker model package``, kit, ollama and oras write
them (tests/peers/modelpacks.py); the views are checked the way an engine reads them: the
GGUF's magic and header, the safetensors' header, config.json as JSON.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from peers import modelpacks as mp
from peers.modelpacks import Entry

from nekko_sm.errors import BrokenLayer, UnsafeLayer, UnsupportedLayer
from nekko_sm.models import formats, unpack
from nekko_sm.models.formats import detect_format, plan
from nekko_sm.models.layouts import says_tar
from nekko_sm.models.paths import check_path, choose_model
from nekko_sm.models.plans import FILE, SNIFF, TAR, resolve_sniffed, sniff
from nekko_sm.store import Lease, Store

PACKS = mp.standard_packs()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache").init()


class Opener:
    """Opens layers from the store (as a pull would, after fetching them) and counts."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.opened: list[str] = []

    def __call__(self, layer):
        self.opened.append(layer.digest)
        return open(self.store.blob_path(layer.digest), "rb")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pulled(store: Store, pack: mp.Pack) -> None:
    """The pack's blobs in the store, as the OCI puller leaves them."""
    for data in pack.blobs.values():
        store.put_bytes(data)


def materialize(store: Store, pack: mp.Pack, opener: Opener | None = None, **kw):
    pulled(store, pack)
    with Lease(store) as lease:
        return unpack.materialize(
            store,
            plan(pack.doc, pack.config),
            opener or Opener(store),
            lease,
            what=pack.producer,
            **kw,
        )


def contents(store: Store, result) -> dict[str, bytes]:
    return {f.name: store.blob_path(f.digest).read_bytes() for f in result.files}


def blob_count(store: Store) -> int:
    return len(list(store.blobs()))


# --------------------------------------------------------------------------------------------
# every producer's pack: its format, its names, its bytes


@pytest.mark.parametrize("name", sorted(PACKS))
def test_each_packaging_unpacks_to_the_names_its_tools_use(store, name):
    pack = PACKS[name]
    assert detect_format(pack.doc) == pack.format
    result = materialize(store, pack)
    assert contents(store, result) == pack.view
    assert result.model == pack.model
    for f in result.files:
        data = contents(store, result)[f.name]
        assert f.digest == "sha256:" + hashlib.sha256(data).hexdigest() and f.size == len(data)
        if f.name.endswith(".safetensors"):
            header = mp.parse_safetensors(data)  # what transformers reads first
            assert any(k != "__metadata__" for k in header)
        if f.name.endswith("config.json"):
            json.loads(data)
    if result.model:
        gguf = mp.parse_gguf(
            store.blob_path(
                next(f.digest for f in result.files if f.name == result.model)
            ).read_bytes()
        )
        assert gguf["version"] == 3 and gguf["kv"]["general.architecture"] == "llama"
    assert store.verify() == []


def test_docker_v01_names_by_type_and_order_not_by_annotation(store):
    pack = PACKS["docker-v01-split"]
    annotated = [d["annotations"]["org.cncf.model.filepath"] for d in pack.doc["layers"]]
    assert annotated[0] == "Nekko-Q4-00001-of-00003.gguf"  # what the packager saw on disk
    result = materialize(store, pack)
    assert [f.name for f in result.files] == [
        "LICENSE",
        "model-00001-of-00003.gguf",
        "model-00002-of-00003.gguf",
        "model-00003-of-00003.gguf",
        "model.mmproj",
    ]
    assert result.model == "model-00001-of-00003.gguf"
    shards = [
        mp.parse_gguf(contents(store, result)[f"model-0000{i}-of-00003.gguf"]) for i in (1, 2, 3)
    ]
    assert [s["kv"]["split.no"] for s in shards] == [0, 1, 2]


def test_docker_v01_dir_tar_unpacks_under_the_directory_name(store):
    pack = mp.docker_model_v01(
        [mp.gguf_bytes()],
        dir_tar=("tokenizer", {"tokenizer.json": b"{}", "nested/vocab.txt": b"a\nb\n"}),
    )
    result = materialize(store, pack)
    assert sorted(contents(store, result)) == [
        "LICENSE",
        "model.gguf",
        "tokenizer/nested/vocab.txt",
        "tokenizer/tokenizer.json",
    ]


def test_docker_v02_keeps_nested_paths(store):
    pack = mp.docker_model_v02(
        {
            "model.safetensors": mp.safetensors_bytes({"w": [1.0]}),
            "text_encoder/config.json": b"{}",
            "text_encoder/model.safetensors": mp.safetensors_bytes({"e": [2.0]}),
        }
    )
    assert detect_format(pack.doc) == "docker-model"
    assert sorted(contents(store, materialize(store, pack))) == [
        "model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
    ]


def test_ollama_names_by_role(store):
    pack = PACKS["ollama"]
    assert pack.doc["mediaType"] == mp.DOCKER_MANIFEST and pack.config.endswith(b"\n")
    result = materialize(store, pack)
    assert [f.name for f in result.files] == [
        "license",
        "model.gguf",
        "params",
        "projector.gguf",
        "system",
        "template",
    ]
    assert result.model == "model.gguf"  # not the projector, also a GGUF


def test_ollama_repeated_roles_and_named_tensor_layers():
    doc = {
        "schemaVersion": 2,
        "mediaType": mp.DOCKER_MANIFEST,
        "config": {"mediaType": mp.DOCKER_CONFIG, "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.adapter",
                "digest": "sha256:" + "1" * 64,
                "size": 1,
            },
            {
                "mediaType": "application/vnd.ollama.image.adapter",
                "digest": "sha256:" + "2" * 64,
                "size": 1,
            },
            {
                "mediaType": "application/vnd.ollama.image.license",
                "digest": "sha256:" + "3" * 64,
                "size": 1,
            },
            {
                "mediaType": "application/vnd.ollama.image.license",
                "digest": "sha256:" + "4" * 64,
                "size": 1,
            },
            {
                "mediaType": "application/vnd.ollama.image.embed",
                "digest": "sha256:" + "5" * 64,
                "size": 1,
            },
            {
                "mediaType": "application/vnd.ollama.image.tensor; dtype=F16",
                "digest": "sha256:" + "6" * 64,
                "size": 1,
                "name": "text_encoder/embed.weight",
            },
        ],
    }
    p = plan(doc)
    assert p.format == "ollama"
    assert [(lp.kind, lp.name) for lp in p.layers] == [
        (FILE, "adapter.gguf"),
        (FILE, "adapter-2.gguf"),
        (FILE, "license"),
        (FILE, "license-2"),
        ("skip", None),
        (FILE, "text_encoder/embed.weight"),
    ]


def test_kitops_new_and_old_modelkits_give_the_same_view(store):
    context = {
        "models/llama.gguf": mp.gguf_bytes("kit"),
        "data/train.csv": b"a,b\n",
        "docs/README.md": b"# docs\n",
        "models/adapter/lora.bin": b"L" * 10,
    }
    kitfile = {
        "manifestVersion": "1.0.0",
        "package": {"name": "kit-test"},
        "model": {
            "name": "llama",
            "path": "models/llama.gguf",
            "parts": [{"path": "models/adapter"}],
        },
        "datasets": [{"name": "train", "path": "data/train.csv"}],
        "docs": [{"path": "docs"}],
    }
    new = mp.kitops(context, kitfile, gzip_layers=True)
    old = mp.kitops(context, kitfile, old=True)
    assert (
        "digest" in json.loads(new.config)["model"]
        and "digest" not in json.loads(old.config)["model"]
    )
    assert "mediaType" not in new.doc  # kit leaves it out
    first = contents(store, materialize(store, new))
    assert first == context
    second_store = Store(store.root.parent / "cache2").init()
    assert contents(second_store, materialize(second_store, old)) == context


def test_modelpack_tar_paths_are_relative_to_the_model_root(store):
    pack = mp.modctl(
        {"weights/part-1.safetensors": mp.safetensors_bytes({"w": [1.0]}), "config.json": b"{}"},
        gzip_layers=True,
    )
    assert all(d["mediaType"].endswith(".tar+gzip") for d in pack.doc["layers"])
    assert sorted(contents(store, materialize(store, pack))) == [
        "config.json",
        "weights/part-1.safetensors",
    ]


def test_oras_directory_keeps_its_title_and_a_link_is_the_same_blob(store):
    pack = PACKS["oras"]
    result = materialize(store, pack)
    by_name = {f.name: f for f in result.files}
    assert sorted(by_name) == [
        "README.md",
        "weights/a.bin",
        "weights/latest.bin",
        "weights/sub/b.bin",
    ]
    assert by_name["weights/latest.bin"].digest == by_name["weights/a.bin"].digest


def test_oras_refuses_a_directory_layer_with_paths_outside_its_title(store):
    pack = mp.oras_directory("weights", {"a.bin": b"A"})
    layer = pack.doc["layers"][0]
    tar = mp.tar_bytes(
        [Entry("weights", type="dir"), Entry("weights/a.bin", b"A"), Entry("other/b.bin", b"B")]
    )
    pack = mp.replace_layer(pack, 0, mp.gzip_bytes(tar), layer["mediaType"], layer["annotations"])
    with pytest.raises(UnsafeLayer, match="outside the layer's directory"):
        materialize(store, pack)


def test_modelcar_view_is_models_after_whiteouts(store):
    pack = PACKS["modelcar"]
    opener = Opener(store)
    result = materialize(store, pack, opener)
    assert result.view_root == "models"
    names = [f.name for f in result.files]
    assert "stale.bin" not in names  # .wh.stale.bin in the top layer
    assert "cache/old.json" not in names and "cache/new.json" in names  # opaque, then new
    assert not any(n.startswith(("bin/", "etc/", "dev/")) for n in names)
    assert len(opener.opened) == 3  # one reading: every view file was under models/
    by_name = {f.name: f for f in result.files}
    assert by_name["current"].digest == by_name["config.json"].digest
    # Stored on the guess that the view is everything (before models/), or hidden later:
    hidden = [b"\x7fELF busybox", b"root:x:0:0::/root:/bin/sh\n", b"old weights", b"{}"]
    assert result.spare == sorted(sha(d) for d in hidden)


def test_an_image_without_models_shows_its_whole_file_system_read_once(store):
    base = [
        Entry("bin", type="dir"),
        Entry("bin/busybox", b"\x7fELF", mode=0o755),
        Entry("bin/sh", type="hardlink", linkname="bin/busybox"),
        Entry("lib", type="dir"),
        Entry("lib/x.so", b"so"),
    ]
    top = [
        Entry("usr", type="dir"),
        Entry("usr/lib", type="symlink", linkname="/lib"),
        Entry("opt", type="dir"),
        Entry("opt/model.gguf", mp.gguf_bytes("img")),
    ]
    pack = mp.image([base, top], {})
    opener = Opener(store)
    result = materialize(store, pack, opener)
    got = contents(store, result)
    assert sorted(got) == ["bin/busybox", "bin/sh", "lib/x.so", "opt/model.gguf", "usr/lib/x.so"]
    assert got["bin/sh"] == got["bin/busybox"] and got["usr/lib/x.so"] == b"so"
    assert {f.name: f.executable for f in result.files}["bin/busybox"]
    assert result.model == "opt/model.gguf"
    assert len(opener.opened) == 2  # one reading: no models/, so every file was stored
    assert result.spare == []


def test_a_docker_v2_image_is_an_image_too(store):
    pack = mp.image(
        [[Entry("models", type="dir"), Entry("models/model.gguf", mp.gguf_bytes())]],
        {},
        docker=True,
    )
    assert pack.doc["mediaType"] == mp.DOCKER_MANIFEST and detect_format(pack.doc) == "image"
    result = materialize(store, pack)
    assert [f.name for f in result.files] == ["model.gguf"] and result.model == "model.gguf"


def test_an_ordinary_image_leaves_out_what_no_engine_opens(store):
    """A distribution's image holds dangling links (/etc/mtab), device nodes and links that
    loop (Debian's /usr/bin/X11 -> .): its whole-file-system view leaves them out."""
    pack = mp.image(
        [
            [
                Entry("etc", type="dir"),
                Entry("etc/os-release", b"ID=test\n"),
                Entry("etc/mtab", type="symlink", linkname="/proc/self/mounts"),
                Entry("dev", type="dir"),
                Entry("dev/null", type="chr"),
                Entry("usr", type="dir"),
                Entry("usr/bin", type="dir"),
                Entry("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
                Entry("usr/bin/X11", type="symlink", linkname="."),
                Entry("usr/null", type="symlink", linkname="/dev/null"),
            ]
        ],
        {},
    )
    result = materialize(store, pack)
    assert sorted(contents(store, result)) == ["etc/os-release", "usr/bin/tool"]


def test_a_dangling_link_in_a_modelcar_view_is_refused(store):
    pack = mp.image(
        [
            [
                Entry("models", type="dir"),
                Entry("models/a", b"a"),
                Entry("models/l", type="symlink", linkname="missing"),
            ]
        ],
        {},
    )
    with pytest.raises(UnsafeLayer, match="names nothing"):
        materialize(store, pack)


def test_an_image_with_a_device_in_its_view_is_refused(store):
    pack = mp.image(
        [[Entry("models", type="dir"), Entry("models/a", b"a"), Entry("models/tty", type="chr")]],
        {},
    )
    with pytest.raises(UnsafeLayer, match="device"):
        materialize(store, pack)


# --------------------------------------------------------------------------------------------
# whiteouts (OCI image-spec layer.md)


def _image_view(store, *layers):
    return contents(store, materialize(store, mp.image([list(x) for x in layers], {})))


def test_whiteouts_hide_only_lower_layers(store):
    got = _image_view(
        store,
        [Entry("models/a", b"1"), Entry("models/d/x", b"x"), Entry("models/d/y", b"y")],
        [
            Entry("models/.wh.a"),
            Entry("models/a2", b"2"),
            Entry("models/.wh.a2"),  # same layer: kept
            Entry("models/.wh.d"),
            Entry("models/d/z", b"z"),
        ],  # d replaced: only z survives
    )
    assert got == {"a2": b"2", "d/z": b"z"}


def test_opaque_whiteout_applies_before_the_layers_own_entries(store):
    got = _image_view(
        store,
        [Entry("models/b/old", b"o"), Entry("models/b/c/bar", b"bar")],
        [Entry("models/b/c/foo", b"foo"), Entry("models/b/.wh..wh..opq")],  # order does not matter
    )
    assert got == {"b/c/foo": b"foo"}


def test_a_file_replaces_a_lower_directory_and_a_lower_file(store):
    got = _image_view(
        store,
        [Entry("models/x/y", b"y"), Entry("models/f", b"old")],
        [Entry("models/x", b"now a file"), Entry("models/f", b"new")],
    )
    assert got == {"x": b"now a file", "f": b"new"}


def test_a_whiteout_without_a_name_is_an_invalid_layer(store):
    with pytest.raises(BrokenLayer, match="whiteout"):
        _image_view(store, [Entry("models/a", b"1")], [Entry("models/.wh.")])


def test_an_image_layer_repeating_a_name_is_refused(store):
    with pytest.raises(UnsafeLayer, match="twice in one layer"):
        _image_view(store, [Entry("models/a", b"1"), Entry("models/a", b"2")])


# --------------------------------------------------------------------------------------------
# hostile tars: refused, nothing outside the cache


HOSTILE = mp.HOSTILE


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_writes_nothing_outside_the_cache(store, tmp_path, case):
    pack = mp.modctl({"config.json": b"{}"})
    pack = mp.replace_layer(
        pack,
        0,
        mp.tar_bytes(HOSTILE[case]),
        "application/vnd.cncf.model.weight.v1.tar",
        {"org.cncf.model.filepath": "model.bin"},
    )
    pulled(store, pack)
    before = _outside(tmp_path, store)
    with pytest.raises(UnsafeLayer) as e, Lease(store) as lease:
        unpack.materialize(
            store, plan(pack.doc, pack.config), Opener(store), lease, what="oci://r/hostile"
        )
    assert e.value.status == 400 and e.value.code == "layer-unsafe"
    assert "oci://r/hostile" in e.value.message
    assert _outside(tmp_path, store) == before
    assert not (store.root / "etc").exists() and not (tmp_path / "escape").exists()
    assert store.verify() == []


def _outside(tmp_path: Path, store: Store) -> list:
    """Every path under tmp_path but the store's blobs and ingest."""
    keep = (store.blobs_dir, store.ingest_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        here = Path(dirpath)
        if any(here == k or k in here.parents for k in keep):
            continue
        out += [str(here / n) for n in filenames + dirnames]
    return sorted(out)


def test_hostile_names_in_annotations_are_refused():
    pack = mp.modctl({"model.gguf": b"GGUF"}, raw=True)
    doc = pack.doc
    doc["layers"][0]["annotations"]["org.cncf.model.filepath"] = "../../etc/cron.d/x"
    with pytest.raises(UnsafeLayer):
        plan(doc)
    doc["layers"][0]["annotations"]["org.cncf.model.filepath"] = "x" * 300
    with pytest.raises(UnsafeLayer, match="255"):
        plan(doc)


def test_two_layers_with_one_name_or_a_file_and_its_directory_are_refused():
    pack = mp.modctl({"a": b"1", "b": b"2"}, raw=True)
    doc = pack.doc
    doc["layers"][1]["annotations"]["org.cncf.model.filepath"] = "a"
    with pytest.raises(UnsafeLayer, match="both named"):
        plan(doc)
    doc["layers"][1]["annotations"]["org.cncf.model.filepath"] = "a/b"
    with pytest.raises(UnsafeLayer, match="file and the directory"):
        plan(doc)


def test_check_path():
    assert check_path("./a//b/c") == "a/b/c"
    for bad in ("/abs", "a/../..", "..", "", "a\\b", "a\x00b", "\udce9.bin", "x" * 256):
        with pytest.raises(UnsafeLayer):
            check_path(bad)


# --------------------------------------------------------------------------------------------
# is this a tar?


@pytest.mark.parametrize(
    "media_type,annotations,expected",
    [
        ("application/vnd.oci.image.layer.v1.tar", {}, True),
        ("application/vnd.oci.image.layer.v1.tar+gzip", {}, True),
        ("application/vnd.oci.image.layer.v1.tar+zstd", {}, True),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", {}, True),
        ("application/vnd.docker.ai.dir.tar", {}, True),
        ("application/vnd.cncf.model.weight.v1.tar", {}, True),
        ("application/vnd.kitops.modelkit.model.v1.tar+gzip", {}, True),
        ("application/vnd.cncf.model.weight.v1.raw", {}, False),
        ("application/vnd.docker.ai.gguf.v3", {}, False),
        ("application/vnd.ollama.image.model", {}, False),
        ("application/octet-stream", {"io.deis.oras.content.unpack": "true"}, True),
        ("application/vnd.example.tarball", {}, False),
    ],
)
def test_says_tar(media_type, annotations, expected):
    assert says_tar(media_type, annotations) is expected


def test_oras_raw_file_labelled_tar_is_a_file():
    pack = PACKS["oras"]
    readme = plan(pack.doc).layers[1]
    assert readme.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert readme.kind == FILE and readme.name == "README.md"


def test_sniff_first_bytes():
    tar = mp.tar_bytes([Entry("a", b"x")])
    assert sniff(mp.gguf_bytes()[:512]) == "gguf"
    assert sniff(mp.gzip_bytes(tar)[:512]) == "gzip"
    assert sniff(b"\x28\xb5\x2f\xfd" + b"\0" * 20) == "zstd"
    assert sniff(tar[:512]) == "tar"
    assert sniff(b"\0" * 1024) == "tar"  # an empty archive
    assert sniff(b"hello") == "unknown"


def test_an_untitled_layer_of_unknown_type_is_judged_by_its_bytes(store):
    tar = mp.tar_bytes([Entry("inside.txt", b"from a tar")])
    raw = b"just bytes"
    empty = b"{}"
    doc = {
        "schemaVersion": 2,
        "mediaType": mp.OCI_MANIFEST,
        "artifactType": "application/vnd.example",
        "config": {"mediaType": mp.OCI_EMPTY, "digest": mp.sha256(empty), "size": 2},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": mp.sha256(tar), "size": len(tar)},
            {"mediaType": "application/octet-stream", "digest": mp.sha256(raw), "size": len(raw)},
        ],
    }
    p = plan(doc)
    assert [lp.kind for lp in p.layers] == [SNIFF, SNIFF]
    assert resolve_sniffed(p.layers[0], tar[:512]).kind == TAR
    pack = mp.Pack(
        "x",
        "artifact",
        mp.go_json(doc),
        mp.OCI_MANIFEST,
        {mp.sha256(b): b for b in (tar, raw, empty)},
        {},
    )
    got = contents(store, materialize(store, pack))
    assert got == {"inside.txt": b"from a tar", mp.sha256(raw).replace(":", "-"): raw}


def test_a_plain_tar_labelled_gzip_is_read_by_its_bytes(store):
    pack = mp.modctl({"config.json": b"{}"})
    pack = mp.replace_layer(
        pack,
        0,
        mp.tar_bytes([Entry("config.json", b"{}")]),
        "application/vnd.cncf.model.weight.config.v1.tar+gzip",
        {"org.cncf.model.filepath": "config.json"},
    )
    assert contents(store, materialize(store, pack)) == {"config.json": b"{}"}


def test_zstd_layer_unpacks_or_is_refused_naming_the_layer(store):
    zstd_cli = shutil.which("zstd")
    tar = mp.tar_bytes([Entry("config.json", b'{"z": 1}')])
    if zstd_cli:
        blob = subprocess.run(
            [zstd_cli, "-q", "-c"], input=tar, capture_output=True, check=True
        ).stdout
    else:
        blob = b"\x28\xb5\x2f\xfd" + b"\0" * 32  # the magic is all the refusal reads
    pack = mp.replace_layer(
        mp.modctl({"x": b""}),
        0,
        blob,
        "application/vnd.cncf.model.weight.config.v1.tar+zstd",
        {"org.cncf.model.filepath": "config.json"},
    )
    try:
        importlib.import_module("compression.zstd")
    except ImportError:
        with pytest.raises(UnsupportedLayer, match=mp.sha256(blob)) as e:
            materialize(store, pack)
        assert "zstd" in e.value.message and e.value.code == "layer-unsupported"
    else:
        assert zstd_cli, "compression.zstd is there: the zstd CLI makes the test layer"
        assert contents(store, materialize(store, pack)) == {"config.json": b'{"z": 1}'}


def test_a_tar_that_does_not_read_is_an_invalid_layer(store):
    pack = mp.replace_layer(
        mp.modctl({"x": b""}),
        0,
        b"\x1f\x8b" + b"garbage" * 100,
        "application/vnd.cncf.model.weight.v1.tar+gzip",
        {"org.cncf.model.filepath": "x"},
    )
    with pytest.raises(BrokenLayer, match="not a readable tar"):
        materialize(store, pack)


# --------------------------------------------------------------------------------------------
# one blob per file: the same bytes from anywhere are stored once


def test_the_same_safetensors_from_the_hub_and_a_registry_is_one_blob(store):
    big = mp.safetensors_bytes({"w": [0.25] * (600 * 1024)})  # 2.4 MB: the streamed path
    small = mp.safetensors_bytes({"s": [1.0, 2.0]})
    assert len(big) > unpack.SMALL
    digests = {}
    for name, data in (("big", big), ("small", small)):  # as an hf:// pull commits them
        with store.writer(f"hf-url:https://hub/{name}", len(data)) as w:
            w.write(data)
            digests[name] = w.commit(None).digest
    before = blob_count(store)
    for packed in (
        mp.modctl({"model.safetensors": big, "small.safetensors": small}, gzip_layers=True),
        mp.docker_model_v02({"model.safetensors": big, "small.safetensors": small}),
    ):
        result = materialize(store, packed)
        by_name = {f.name: f.digest for f in result.files}
        assert by_name == {
            "model.safetensors": digests["big"],
            "small.safetensors": digests["small"],
        }
    # New blobs: modctl's two tar layers and its config, v0.2's config (its raw layers ARE
    # the files, already there); never a second copy of a file.
    assert blob_count(store) - before == 2 + 1 + 1


def test_a_streamed_file_is_hashed_as_written(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    pack = mp.modctl({"weights.bin": data}, gzip_layers=True)
    seen = []
    result = materialize(store, pack, on_bytes=seen.append)
    (f,) = result.files
    assert f.digest == "sha256:" + hashlib.sha256(data).hexdigest() and f.size == len(data)
    assert sum(seen) == len(data) and max(seen) <= unpack.CHUNK
    assert not any(store.ingest_dir.glob("*/data"))  # committed, nothing partial left


def test_small_files_are_stored_without_an_ingest_each_and_crash_leftovers_go(store):
    files = {f"f{i}.txt": os.urandom(100 + i) for i in range(50)}
    result = materialize(store, mp.modctl(files, gzip_layers=True))
    assert contents(store, result) == files
    for f in result.files:
        assert store.blob_path(f.digest).stat().st_mode & 0o777 == 0o444  # read-only
    assert [p.name for p in store.ingest_dir.iterdir() if p.name.startswith(".small-")] == []
    left = store.ingest_dir / ".small-0123456789abcdef-1-2"  # a crash before its rename
    left.write_bytes(b"partial")
    store.gc()
    assert left.exists()  # it may be a live unpack's: only an old one goes
    os.utime(left, (0, 0))
    store.gc()
    assert not left.exists() and store.verify() == []


def test_a_cancelled_pull_stops_unpacking(store):
    import threading

    from nekko_sm.errors import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        materialize(store, PACKS["modctl"], cancel=cancel)


# --------------------------------------------------------------------------------------------
# which file llama.cpp loads


@pytest.mark.parametrize(
    "names,expected",
    [
        (["model.gguf", "LICENSE"], "model.gguf"),
        (
            ["a/x-00001-of-00003.gguf", "a/x-00002-of-00003.gguf", "a/x-00003-of-00003.gguf"],
            "a/x-00001-of-00003.gguf",
        ),
        (["x-00002-of-00002.gguf"], None),  # the first shard is missing
        (["model.gguf", "projector.gguf", "mmproj-f16.gguf", "adapter.gguf"], "model.gguf"),
        (["q4.gguf", "q8.gguf"], None),  # two models: none is *the* model
        (["model.safetensors"], None),
        (["Model.GGUF"], "Model.GGUF"),
    ],
)
def test_choose_model(names, expected):
    assert choose_model(names) == expected


def test_formats_of_other_manifests():
    base = {"schemaVersion": 2, "mediaType": mp.OCI_MANIFEST, "layers": []}
    cfg = {"digest": "sha256:" + "0" * 64, "size": 2}
    assert detect_format({**base, "config": {**cfg, "mediaType": mp.OCI_CONFIG}}) == "image"
    assert (
        detect_format(
            {
                **base,
                "config": {**cfg, "mediaType": mp.OCI_EMPTY},
                "artifactType": "application/vnd.nekko.hf.repo.v1",
            }
        )
        == "artifact"
    )
    assert (
        detect_format(
            {
                **base,
                "config": {**cfg, "mediaType": mp.OCI_CONFIG},
                "artifactType": "application/vnd.cnai.model.manifest.v1+json",
            }
        )
        == "modelpack"
    )
    with pytest.raises(formats.ManifestInvalid):
        detect_format({"schemaVersion": 2, "manifests": []})


# --------------------------------------------------------------------------------------------
# the fixtures themselves, against a real registry


def test_packs_push_to_a_real_registry_byte_for_byte(registry):
    from peers import require_binary

    require_binary("docker-registry")
    accept = f"{mp.OCI_MANIFEST}, {mp.DOCKER_MANIFEST}"
    for name, pack in sorted(PACKS.items()):
        url = mp.push_pack(registry, f"models/{name}:v1", pack)
        assert url.endswith(f"/models/{name}:v1")
        got = registry.request("GET", f"/v2/models/{name}/manifests/v1", {"Accept": accept})
        assert got.status == 200 and got.body == pack.manifest, name
        assert got.headers["content-type"].split(";")[0] == pack.media_type
        assert detect_format(json.loads(got.body)) == pack.format
        for digest, data in pack.blobs.items():
            blob = registry.request("GET", f"/v2/models/{name}/blobs/{digest}")
            assert blob.status == 200 and blob.body == data, (name, digest)


# --------------------------------------------------------------------------------------------


def test_builders_write_go_shaped_tars():
    tar = mp.tar_bytes([Entry("a", b"x")])
    assert len(tar) == 512 + 512 + 1024  # no padding to a 10 KiB record, as Go's writer
    assert mp.go_json({"a": "<&>"}) == b'{"a":"\\u003c\\u0026\\u003e"}'
    info = io.BytesIO(tar)
    import tarfile

    with tarfile.open(fileobj=info) as t:
        (m,) = t.getmembers()
        assert (m.name, m.uname, m.gname) == ("a", "", "")


# --------------------------------------------------------------------------------------------
# an ordinary image's whole file system: its layers read a second time


def _whole_image_layers(n: int) -> list:
    return [
        [Entry(f"usr/lib/l{i}/f{j}.so", os.urandom(3000 + j)) for j in range(5)]
        + [Entry(f"etc/conf{i}", b"x" * i)]
        for i in range(n)
    ]


def test_a_layer_that_reads_otherwise_the_second_time_is_a_broken_layer(store):
    # models/ first, hidden by the last layer: the view turns out to be the whole file
    # system only then, so the files outside models/ are read a second time.
    layers = _whole_image_layers(4)
    first = [Entry("models", type="dir"), Entry("models/a", b"a"), *layers[0]]
    pack = mp.image([first, *layers[1:], [Entry(".wh.models")]], {})
    pulled(store, pack)
    layers = [d["digest"] for d in pack.doc["layers"]]
    seen: dict = {}

    def opener(layer):  # the third layer reads as the first one on its second reading
        seen[layer.digest] = seen.get(layer.digest, 0) + 1
        digest = (
            layers[0] if layer.digest == layers[2] and seen[layer.digest] == 2 else layer.digest
        )
        return open(store.blob_path(digest), "rb")

    with pytest.raises(BrokenLayer, match="changed between two readings"), Lease(store) as lease:
        unpack.materialize(store, plan(pack.doc, pack.config), opener, lease, what="oci://r/x")
    assert store.verify() == []
