"""URL parsing and canonical keys (DESIGN section 3)."""

from __future__ import annotations

import pytest

from nekko_sm.errors import InvalidReference, UnsafeName, UnsupportedScheme
from nekko_sm.refparse import parse
from nekko_sm.refs import HFRef, OCIRef, redact, safe_name

EP = "https://huggingface.co"


@pytest.mark.parametrize(
    "url, canonical",
    [
        ("oci://docker.io/alpine", "oci://docker.io/library/alpine:latest"),
        ("oci://index.docker.io/library/alpine:3.20", "oci://docker.io/library/alpine:3.20"),
        ("oci://ghcr.io/org/img:v1", "oci://ghcr.io/org/img:v1"),
        ("oci://127.0.0.1:5000/a/b/c", "oci://127.0.0.1:5000/a/b/c:latest"),
        ("oci://reg.io/x@sha256:" + "a" * 64, "oci://reg.io/x@sha256:" + "a" * 64),
        ("oci://reg.io/x:tag@sha256:" + "a" * 64, "oci://reg.io/x@sha256:" + "a" * 64),
        ("OCI://REG.IO/x", "oci://reg.io/x:latest"),
        ("oci://reg.io/x?platform=linux/arm64", "oci://reg.io/x:latest?platform=linux/arm64"),
        ("oci://reg.io/x:1?platform=ALL", "oci://reg.io/x:1?platform=all"),
        (
            "oci://reg.io/x@sha256:" + "a" * 64 + "?platform=linux/arm/v7",
            "oci://reg.io/x@sha256:" + "a" * 64 + "?platform=linux/arm/v7",
        ),
    ],
)
def test_oci_canonical(url, canonical):
    assert parse(url).canonical == canonical


def test_docker_hub_api_host():
    ref = parse("oci://docker.io/alpine")
    assert isinstance(ref, OCIRef) and ref.api_host == "registry-1.docker.io"
    assert ref.repository == "library/alpine" and ref.reference == "latest"


@pytest.mark.parametrize(
    "url",
    [
        "oci://reg.io",
        "oci://reg.io/UPPER",
        "oci://reg.io/x@sha256:abc",
        "oci://reg.io/x:bad tag",
        "oci://reg.io:99999/x",
        "oci://reg.io/../x",
        "oci:///x",
        "oci://reg.io/x?tag=1",
        "oci://reg.io/x?platform=linux",
        "oci://reg.io/x?platform=a/b/c/d",
    ],
)
def test_oci_bad(url):
    with pytest.raises(InvalidReference):
        parse(url)


@pytest.mark.parametrize(
    "url, canonical",
    [
        (
            "hf:///unsloth/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q2_K.gguf",
            "hf://huggingface.co/unsloth/SmolLM2-135M-Instruct-GGUF@main/SmolLM2-135M-Instruct-Q2_K.gguf",
        ),
        (
            "hf:///unsloth//SmolLM2-135M-Instruct-GGUF/x.gguf",
            "hf://huggingface.co/unsloth/SmolLM2-135M-Instruct-GGUF@main/x.gguf",
        ),
        (
            "huggingface://huggingface.co/org/name@v1.0/sub/dir/f.bin",
            "hf://huggingface.co/org/name@v1.0/sub/dir/f.bin",
        ),
        ("hf://org/name/file.txt", "hf://huggingface.co/org/name@main/file.txt"),
        ("hf://hf.co/org/name", "hf://huggingface.co/org/name@main"),
        (
            "hf://huggingface.co/datasets/org/ds/data/train.csv",
            "hf://huggingface.co/datasets/org/ds@main/data/train.csv",
        ),
        (
            "hf://huggingface.co/spaces/org/sp@main/app.py",
            "hf://huggingface.co/spaces/org/sp@main/app.py",
        ),
        (
            "hf://huggingface.co/org/name@refs/pr/1/f.txt",
            "hf://huggingface.co/org/name@refs/pr/1/f.txt",
        ),
        (
            "hf://huggingface.co/org/name@refs%2Fpr%2F1/f.txt",
            "hf://huggingface.co/org/name@refs/pr/1/f.txt",
        ),
        ("hf://localhost:8080/org/name/f", "hf://localhost:8080/org/name@main/f"),
        (
            "hf://huggingface.co/org/name@" + "a" * 40 + "/f",
            "hf://huggingface.co/org/name@" + "a" * 40 + "/f",
        ),
    ],
)
def test_hf_canonical(url, canonical):
    assert parse(url, EP).canonical == canonical


def test_hf_default_endpoint_from_config():
    ref = parse("hf:///org/name/f", "http://127.0.0.1:9999")
    assert isinstance(ref, HFRef) and ref.registry == "127.0.0.1:9999"
    assert ref.quoted_revision == "main"
    pr = parse("hf://h.io/org/name@refs/pr/3/f", EP)
    assert pr.quoted_revision == "refs%2Fpr%2F3" and pr.path == "f"


@pytest.mark.parametrize(
    "url",
    ["hf:///org", "hf:///org/name/../../etc/passwd", "hf:///org/na me/f", "hf:///org@x/name/f"],
)
def test_hf_bad(url):
    with pytest.raises((InvalidReference, UnsafeName)):
        parse(url, EP)


@pytest.mark.parametrize(
    "url, canonical",
    [
        ("https://user:pw@Example.COM:443/a/b.bin?x=1#frag", "https://example.com/a/b.bin?x=1"),
        ("http://example.com:8080", "http://example.com:8080/"),
        ("HTTP://[::1]:80/x", "http://[::1]/x"),
    ],
)
def test_http_canonical(url, canonical):
    assert parse(url).canonical == canonical


def test_http_userinfo_kept_apart():
    ref = parse("https://bob:se%40cret@example.com/f")
    assert ref.userinfo == "bob:se@cret" and "bob" not in ref.canonical


@pytest.mark.parametrize(
    "url", ["ftp://x/y", "file:///etc/passwd", "s3://b/k", "nonsense", "", "javascript:alert(1)"]
)
def test_unknown_schemes(url):
    with pytest.raises(InvalidReference):
        parse(url)
    if "://" in url:
        with pytest.raises(UnsupportedScheme):
            parse(url)


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/../../b", "C:/x", "a\\b", "", ".", "a\x00b", "..", "a/\n"]
)
def test_unsafe_names(name):
    with pytest.raises(UnsafeName):
        safe_name(name)


def test_safe_names_normalised():
    assert safe_name("a/./b//c.txt") == "a/b/c.txt"


def test_redact_drops_userinfo_and_query():
    assert redact("https://u:p@h/x?X-Amz-Signature=secret") == "https://h/x"
