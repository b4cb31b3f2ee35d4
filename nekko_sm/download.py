"""One resumable download of a URL into a store writer, in one stream or in ranges.

This module owns what :meth:`nekko_sm.transfer.Transfer.download` does with the answers:
resume from what the writer holds (``Range``, with ``If-Range`` unless the bytes are
content-addressed), start over when the server ignores the range or the content changed,
check every length it is promised, retry broken connections without counting an attempt
that made progress, and hand a large body whose server takes ranges to
:mod:`nekko_sm.ranged`.  It sends requests only through the transfer it is given (pools,
proxies, redirects and credentials are :mod:`nekko_sm.transfer`'s) and never imports it.
"""

from __future__ import annotations

import http.client
import logging
from collections.abc import Mapping

from urllib3.exceptions import HTTPError as _Urllib3Error

from nekko_sm import ranged, ranged_control, ranged_parts
from nekko_sm.errors import (
    Forbidden,
    NekkoError,
    SizeMismatch,
    Unauthorized,
    UpstreamUnavailable,
)
from nekko_sm.httpio import (
    MAX_STALLS,
    content_range,
    content_range_total,
    fill,
    is_stall,
    read_limited,
    reason,
)
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.transfer")

CHUNK = 1 << 20


def download(
    transfer,
    url: str,
    writer,
    *,
    auth,
    headers,
    expected_size,
    immutable,
    errors,
    progress,
    on_total,
    max_span,
    connections,
) -> Mapping[str, str]:
    """See :meth:`nekko_sm.transfer.Transfer.download`."""
    conns = max(1, transfer.config.jobs if connections is None else connections)
    ranges_refused = False
    failures = stalls = 0
    total_hint = expected_size
    while True:
        before = _progress_mark(writer)
        try:
            if writer.state.get("ranged") and not ranges_refused:
                if on_total is not None:
                    on_total(writer.state["ranged"]["total"], _progress_mark(writer))
                    on_total = None
                _fetch_ranged(
                    transfer, url, writer, auth, headers, errors, progress, conns, max_span
                )
                return writer.state.get("headers") or {}
            if (
                not ranges_refused
                and expected_size is not None
                and immutable
                and _wants_ranges(expected_size - writer.offset, conns, max_span)
            ):
                _start_ranged(writer, expected_size, None, conns, max_span)
                continue
            result = _download_once(
                transfer,
                url,
                writer,
                auth,
                headers,
                expected_size,
                immutable,
                errors,
                progress,
                on_total,
                max_span,
                1 if ranges_refused else conns,
            )
            on_total = None if writer.offset else on_total
            if max_span and total_hint is not None and before < writer.offset < total_hint:
                failures = 0  # one span done: ask for the next
                continue
            return result
        except ranged.RangesRefused:
            log.info("%s: server does not honour ranges; one stream instead", redact(url))
            ranges_refused = True
            writer.reset()
        except UpstreamUnavailable as e:
            if _progress_mark(writer) > before:
                failures = 0  # it was moving: a broken connection, not a dead server
            if e.context.get("stalled") and stalls < MAX_STALLS:
                stalls += 1  # a quiet connection is replaced, not held against the server
            else:
                failures += 1
            if failures >= transfer.attempts:
                raise
            transfer._sleep(
                failures,
                e.retry_after,  # one visible line per wait
                f"{e.message}; resuming at byte {writer.offset}",
            )
        except (Unauthorized, Forbidden) as e:
            # An expired signed URL at a CDN: ask the origin again, once or twice.
            if not e.context.get("redirected") or failures >= 2:
                raise
            failures += 1
            log.info("%s: redirect target refused us; asking the origin again", redact(url))


def _wants_ranges(remaining: int, conns: int, max_span: int | None) -> bool:
    return (conns > 1 and remaining >= ranged.MIN_PARALLEL) or bool(
        max_span and remaining > max_span
    )


def _start_ranged(
    writer, total: int, validator: str | None, conns: int, max_span: int | None
) -> None:
    """Turn ``writer`` into a ranged download of ``total`` bytes from its frontier."""
    if (
        total >= ranged_control.GROW_MIN and conns > 1
    ):  # parts enough for every connection it may get
        conns = max(conns, ranged_control.MAX_CONNECTIONS)
    part = ranged_parts.part_size_for(total, conns, max_span)
    done = writer.offset
    parts = ([[0, done, done]] if done else []) + ranged_parts.plan(total, part, done)
    # The map first: killed after the preallocation, a restart must not take the file's
    # full size (zeros) for downloaded bytes; the map says what is really there.
    writer.save_state(ranged={"total": total, "parts": parts, "validator": validator})
    writer.preallocate(total)


def _fetch_ranged(
    transfer, url, writer, auth, headers, errors, progress, conns, max_span, first=None
) -> None:
    state = writer.state["ranged"]
    fetch = ranged.RangedFetch(
        transfer,
        url,
        writer,
        auth=auth,
        headers=headers,
        validator=state.get("validator"),
        errors=errors,
        progress=progress,
        connections=conns,
        max_span=max_span,
    )
    fetch.run(first)


def _download_once(
    transfer,
    url,
    writer,
    auth,
    headers,
    expected_size,
    immutable,
    errors,
    progress,
    on_total,
    max_span=None,
    conns=1,
) -> Mapping[str, str]:
    if expected_size is not None and writer.offset == expected_size and expected_size > 0:
        return {}
    h = dict(headers or {})
    validator = writer.state.get("validator")
    if writer.offset > 0 and not (immutable or validator):
        writer.reset()
    end = ""
    if max_span and expected_size is not None and expected_size - writer.offset > max_span:
        end = str(writer.offset + max_span - 1)
    if writer.offset > 0 or end:
        h["Range"] = f"bytes={writer.offset}-{end}"
        if writer.offset > 0 and not immutable:
            h["If-Range"] = validator
    resp, final = transfer.open("GET", url, h, auth)
    try:
        status = resp.status
        if status == 416 and writer.offset > 0:
            total = content_range_total(resp.headers.get("Content-Range"))
            promised = writer.state.get("total")
            if total is not None and total == writer.offset and promised in (None, total):
                return resp.headers
            writer.reset()
            if promised is not None and total is not None and promised != total:
                raise SizeMismatch(f"{redact(url)}: promised {promised} bytes, has {total}")
            raise UpstreamUnavailable(f"{redact(url)}: range not satisfiable; starting over")
        if status not in (200, 206):
            body = read_limited(resp, 64 << 10, url, strict=False)
            err = errors(status, final, body, resp.headers)
            if final != url:
                err.context["redirected"] = True
            raise err
        whole = None  # the size of the whole resource, when the answer says it
        if status == 206:
            start, whole = content_range(resp.headers.get("Content-Range"))
            if start != writer.offset:
                writer.reset()
                raise UpstreamUnavailable(
                    f"{redact(url)}: asked for bytes from {writer.offset}, got {start}"
                )
            if whole is not None and expected_size is not None and whole != expected_size:
                raise SizeMismatch(
                    f"{redact(url)}: server has {whole} bytes, expected {expected_size}"
                )
        elif writer.offset:
            log.info("%s: server ignored Range; starting over", redact(url))
            writer.reset()
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if status == 200:
            whole = remaining
            if whole is not None and expected_size is not None and whole != expected_size:
                raise SizeMismatch(
                    f"{redact(url)}: Content-Length {whole}, expected {expected_size}; refusing"
                )
        if status == 200 or not writer.state.get("validator"):
            etag = resp.headers.get("ETag")
            validator = (
                etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            )
            writer.save_state(
                url=redact(url),
                validator=validator,
                total=whole,
                headers=_kept_headers(resp.headers),
            )
        if on_total is not None:
            on_total(whole if whole is not None else expected_size, writer.offset)
        takes_ranges = status == 206 or resp.headers.get("Accept-Ranges", "").lower() == "bytes"
        if (
            whole is not None
            and takes_ranges
            and (immutable or validator)
            and _wants_ranges(whole - writer.offset, conns, max_span)
        ):
            # Big, and the server takes ranges: this answer brings the first part while
            # the other parts come over other connections.
            _start_ranged(writer, whole, None if immutable else validator, conns, max_span)
            _fetch_ranged(
                transfer, url, writer, auth, headers, errors, progress, conns, max_span, first=resp
            )
            return resp.headers
        _stream(resp, writer, url, remaining, progress)
        if expected_size is not None and writer.offset < expected_size and remaining is None:
            raise UpstreamUnavailable(
                f"{redact(url)}: body ended after {writer.offset} of {expected_size} bytes"
            )
        return resp.headers
    except BaseException:
        resp.close()  # the body was not read to its end: never back into the pool
        raise
    finally:
        resp.release_conn()


def _stream(resp, writer, url, remaining, progress) -> None:
    got = 0
    try:
        while True:
            # Straight from the socket into a buffer the writer then owns (and hashes
            # from); what arrived before a stall or a reset is kept, so a resume asks only
            # for the bytes after it.
            buf = writer.buffer()
            want = len(buf) if remaining is None else min(len(buf), remaining - got)
            if want <= 0:
                break
            n, err = fill(resp, buf[:want])
            if n:
                writer.write(buf[:n])
                got += n
                if progress is not None:
                    progress(n)
            if err is not None:
                raise err
            if not n:
                break  # the body ended
    except BaseException as e:
        # Whatever stopped us, the body is not read to its end: this connection must
        # not go back to the pool (release_conn would hand it to the next request).
        resp.close()
        if isinstance(e, NekkoError) or not isinstance(
            e, (_Urllib3Error, OSError, http.client.HTTPException)
        ):
            raise  # disk full, cancelled, too many bytes, Ctrl-C: not the network's fault
        raise UpstreamUnavailable(
            f"{redact(url)}: connection broke after {got} bytes: {reason(e)}", stalled=is_stall(e)
        ) from e
    if remaining is not None and got < remaining:
        resp.close()
        raise UpstreamUnavailable(f"{redact(url)}: body ended after {got} of {remaining} bytes")


def _progress_mark(writer) -> int:
    """Bytes a writer holds: its frontier, or for a ranged download every part's progress."""
    r = writer.state.get("ranged")
    if not r:
        return writer.offset
    return sum(int(p[2]) - int(p[0]) for p in r.get("parts", []))


def _kept_headers(headers: Mapping[str, str]) -> dict:
    """The answer headers a source reads after a download (kept for a ranged resume)."""
    keep = ("ETag", "Content-Disposition", "Content-Type", "Last-Modified")
    return {k: headers[k] for k in keep if headers.get(k)}
