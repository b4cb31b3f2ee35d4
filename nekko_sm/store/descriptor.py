"""The OCI content descriptor: what names a blob, in memory and in JSON.

This module owns :class:`Descriptor` (media type, digest, size, annotations, artifact
type, platform), its JSON form as the OCI image spec spells it, the compact encoding
``index.json`` and the database keep, and the checks a descriptor read back must pass
(an object, a size that is a non-negative integer, a well-formed digest).  It never
touches a file, a lock or the database.
"""

from __future__ import annotations

import json

from nekko_sm.errors import CacheCorrupt
from nekko_sm.record import dataclass, field
from nekko_sm.store.layout import check_digest


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)
    artifact_type: str | None = None
    platform: dict | None = None

    def to_json(self) -> dict:
        d: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.platform:
            d["platform"] = self.platform
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    def encode(self) -> str:
        """As index.json spells it: compact, keys sorted."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, d: dict) -> Descriptor:
        if not isinstance(d, dict):
            raise CacheCorrupt(f"descriptor is not an object: {d!r:.80}")
        size = d.get("size")
        if not isinstance(size, int) or size < 0:
            raise CacheCorrupt(f"descriptor has a bad size: {d!r:.120}")
        return cls(
            media_type=str(d.get("mediaType", "")),
            digest=check_digest(d.get("digest", "")),
            size=size,
            annotations=dict(d.get("annotations") or {}),
            artifact_type=d.get("artifactType"),
            platform=d.get("platform"),
        )
