"""Plain http(s) URLs ("components"): one file, stored raw, wrapped in an artifact manifest."""

from __future__ import annotations

import re
from urllib.parse import unquote

from nekko_sm.credentials import Credentials
from nekko_sm.errors import ManifestInvalid, UnsafeName
from nekko_sm.refs import HTTPRef, safe_name
from nekko_sm.sources.base import (
    A_ETAG,
    A_SOURCE_URL,
    FileItem,
    Job,
    PullResult,
    check_names,
    file_result,
)

ARTIFACT_TYPE = "application/vnd.nekko.file.v1"

_CD_STAR = re.compile(r"filename\*\s*=\s*([\w-]+)'[^']*'([^;]+)", re.IGNORECASE)
_CD_PLAIN = re.compile(r'filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))', re.IGNORECASE)


def file_name_from(content_disposition: str | None, fallback: str) -> str:
    """The file name a server suggests, made safe (only the last path component is kept)."""
    name = None
    if content_disposition:
        m = _CD_STAR.search(content_disposition)
        if m:
            try:
                name = unquote(m.group(2).strip(), encoding=m.group(1) or "utf-8")
            except LookupError:
                name = None
        if name is None:
            m = _CD_PLAIN.search(content_disposition)
            if m:
                name = m.group(1) if m.group(1) is not None else m.group(2)
                name = re.sub(r"\\(.)", r"\1", name)
    if name:
        name = name.replace("\\", "/").rsplit("/", 1)[-1]
        try:
            name = safe_name(name)
            check_names([name], "")  # no control or bidi character, not too long
            return name
        except (UnsafeName, ManifestInvalid):
            pass
    return fallback


def pull(job: Job, ref: HTTPRef) -> PullResult:
    creds = job.credentials
    if creds is None and ref.userinfo:
        user, _, password = ref.userinfo.partition(":")
        creds = Credentials.basic(user, password)
    auth = creds.header if creds else None

    # A caller's digest only checks what the URL serves: even when those bytes are cached
    # already, the URL is fetched, or any caller could bind any URL to any cached content.
    def check_space(total: int | None, offset: int) -> None:
        if total is not None:
            if job.progress.total is None:
                job.progress.expect(total)
                job.progress.add(offset)
            job.ensure_space(total - offset, ref.canonical, offset)

    with job.writer("url:" + ref.canonical) as w:
        headers = job.transfer.download(
            ref.fetch_url, w, auth=auth, progress=job.progress.add, on_total=check_space
        )
        desc = w.commit(job.digest, job.lease)
    name = file_name_from(headers.get("Content-Disposition"), ref.file_name)
    return file_result(
        job,
        FileItem(name, desc.digest, desc.size),
        ARTIFACT_TYPE,
        {A_SOURCE_URL: ref.canonical, A_ETAG: headers.get("ETag")},
    )
