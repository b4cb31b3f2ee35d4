"""Credentials from a request: a token type and value, never written to disk or logged."""

from __future__ import annotations

from nekko_sm.errors import BadRequest, InvalidBase64
from nekko_sm.record import dataclass, field


@dataclass(frozen=True)
class Credentials:
    type: str  # "Bearer" or "Basic"
    value: str = field(repr=False)

    @classmethod
    def make(cls, value: str | None, type_: str | None = None) -> Credentials | None:
        if value is None or value == "":
            if type_ not in (None, "") and str(type_).lower() not in ("bearer", "basic"):
                raise BadRequest(f"credentialsType must be Bearer or Basic, not {type_!r}")
            return None
        if not isinstance(value, str):
            raise BadRequest("credentials must be a string")
        t = type_ or "Bearer"
        if not isinstance(t, str) or t.lower() not in ("bearer", "basic"):
            raise BadRequest(f"credentialsType must be Bearer or Basic, not {str(t)[:40]!r}")
        if not all(" " <= c <= "~" for c in value):  # a header value: printable ASCII only
            raise BadRequest("credentials must be printable ASCII (no control characters)")
        creds = cls("Basic" if t.lower() == "basic" else "Bearer", value.strip())
        if creds.type == "Basic":
            creds.user_pass()  # validate now: bad base64 is the caller's mistake (400)
        return creds

    @classmethod
    def basic(cls, user: str, password: str) -> Credentials:
        import base64  # here and below: no cold command decodes credentials

        return cls("Basic", base64.b64encode(f"{user}:{password}".encode()).decode())

    def user_pass(self) -> tuple[str, str]:
        import base64
        import binascii

        try:
            raw = base64.b64decode(self.value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise InvalidBase64("Basic credentials must be base64 of user:password") from None
        if ":" not in raw:
            raise InvalidBase64("Basic credentials must be base64 of user:password")
        user, _, password = raw.partition(":")
        return user, password

    @property
    def header(self) -> str:
        return f"{self.type} {self.value}"
