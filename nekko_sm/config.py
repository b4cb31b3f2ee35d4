"""One frozen Config, built once from flags, then environment, then defaults (DESIGN section 2).

Nothing here reads the environment at import time; :func:`build` is handed the parsed
flags and an environment mapping, so tests pass their own.  The syntax of each value (sizes,
addresses, numbers, lists) is :mod:`nekko_sm.config_values`'s; the platform's is here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from nekko_sm.config_values import (
    Address,
    parse_address,
    parse_bool,
    parse_free_space,
    parse_int,
    parse_size,
    read_api_token,
    split_list,
)
from nekko_sm.egress import Policy
from nekko_sm.errors import ConfigError, InvalidPlatform
from nekko_sm.record import dataclass, field

DEFAULT_CACHE_DIR = "/var/lib/nekko/cache"
DEFAULT_ADDRESS = "localhost:8050"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_JOBS = 8
MAX_JOBS = 64
DEFAULT_MAX_PULL_SIZE = 2 << 40  # 2 TiB: more than any model, less than a node's disks
# Files (blobs) one pull may create: a Hub repository's files, an image's layers.  The Hub
# advises fewer than 10,000 files per directory; a model has tens to hundreds.
DEFAULT_MAX_PULL_FILES = 10_000

_OSES = {
    "linux",
    "windows",
    "darwin",
    "freebsd",
    "netbsd",
    "openbsd",
    "solaris",
    "illumos",
    "aix",
    "android",
    "ios",
    "plan9",
    "dragonfly",
    "js",
    "wasip1",
}
_ARCHES = {
    "amd64",
    "arm64",
    "arm",
    "386",
    "ppc64le",
    "ppc64",
    "s390x",
    "riscv64",
    "mips64le",
    "mips64",
    "mipsle",
    "mips",
    "loong64",
    "wasm",
}
_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)

    def to_json(self) -> dict:
        d = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            d["variant"] = self.variant
        return d


def normalize_arch(arch: str, variant: str | None = None) -> tuple[str, str | None]:
    """Map an architecture spelling to OCI's (``x86_64``→``amd64``, ``armv7l``→``arm``/``v7``)."""
    arch = arch.lower()
    m = re.match(r"^armv(\d+)\w*$", arch)
    if m:
        return "arm", variant or f"v{m.group(1)}"
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "arm64" and variant == "v8":
        variant = None  # v8 is arm64's only variant; treat "arm64/v8" as "arm64"
    if arch == "arm" and variant is None:
        variant = "v7"
    return arch, variant


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidPlatform(f"bad platform {text!r}: want os/arch[/variant] or 'all'")
    os_name = parts[0].lower()
    arch, variant = normalize_arch(parts[1], parts[2].lower() if len(parts) == 3 else None)
    if os_name not in _OSES:
        raise InvalidPlatform(f"unknown platform os {parts[0]!r} in {text!r}")
    if arch not in _ARCHES:
        raise InvalidPlatform(f"unknown platform architecture {parts[1]!r} in {text!r}")
    return Platform(os_name, arch, variant)


def host_platform() -> Platform:
    import platform as _platform  # here: status, path and ls never need it

    arch, variant = normalize_arch(_platform.machine() or "amd64")
    return Platform(
        "linux"
        if os.name == "posix" and _platform.system() == "Linux"
        else _platform.system().lower() or "linux",
        arch,
        variant,
    )


def _loopback(host: str) -> bool:
    """``host`` names this machine (nothing sent to it leaves it)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    cache_dir: Path
    address: Address
    verbose: int = 0
    platform: str = ""  # "all", or os/arch[/variant]; "" means the host's
    insecure_registries: frozenset = frozenset()
    jobs: int = DEFAULT_JOBS
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: str | None = None
    hf_token_repos: tuple = ()  # fnmatch patterns of repo ids HF_TOKEN may be used for; () = all
    registry_mirrors: Mapping[str, tuple] = field(default_factory=dict)
    ca_cert: str | None = None
    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str | None = None
    max_pull_size: int = DEFAULT_MAX_PULL_SIZE
    max_pull_files: int = DEFAULT_MAX_PULL_FILES
    api_token_file: str | None = None  # the path only: the token is read by the server
    egress: Policy = field(default_factory=Policy.build)
    verify_cached_credentials: str = "always"  # or "never" (DESIGN section 10)
    max_cache_size: int | None = None  # bytes under blobs/ and ingest/ (DESIGN 9)
    min_free_space: int | None = None  # bytes to keep free on the cache's file system
    min_free_percent: float | None = None  # ... or this share of it
    discard_unpacked_layers: bool = False  # free tar layers once their files are committed
    notes: tuple = ()  # things to say once at start-up

    @property
    def default_platform(self) -> Platform | None:
        """The platform to choose from an index, or None for 'all'."""
        if self.platform == "all":
            return None
        return parse_platform(self.platform) if self.platform else host_platform()

    def is_insecure(self, host: str) -> bool:
        host = host.lower()
        return host in self.insecure_registries or host.split(":")[0] in self.insecure_registries


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        v = environ.get(n)
        if v is not None and v != "":
            return v
    return None


def _usable_dir(path: Path) -> bool:
    try:  # each missing directory 0755 exactly: not 0777 & ~umask (world-writable at 000)
        for d in [*reversed(path.absolute().parents), path]:
            if not d.is_dir():
                d.mkdir(0o755, exist_ok=True)
                os.chmod(d, 0o755)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def build(
    flags: Mapping[str, object], environ: Mapping[str, str], need_cache: bool = True
) -> Config:
    """Resolve every option: flag > environment (NEKKO_*, then STORAGE_MANAGER_*) > default."""
    notes: list[str] = []

    def pick(flag: str, *envs: str) -> object:
        v = flags.get(flag)
        return v if v not in (None, [], "") else _env(environ, *envs)

    verbose = pick("verbose", "VERBOSE", "STORAGE_MANAGER_VERBOSE")
    verbose_n = parse_int(verbose, "--verbose/VERBOSE", 0, 3) if verbose is not None else 0

    addr = pick("address", "NEKKO_ADDRESS", "STORAGE_MANAGER_ADDRESS") or DEFAULT_ADDRESS
    address = parse_address(str(addr))

    plat = pick("platform", "NEKKO_PLATFORM")
    plat_s = ""
    if plat:
        plat_s = "all" if str(plat).strip().lower() == "all" else str(parse_platform(str(plat)))

    jobs_v = pick("jobs", "NEKKO_JOBS")
    jobs = (
        parse_int(jobs_v, "--jobs/NEKKO_JOBS", 1, MAX_JOBS) if jobs_v is not None else DEFAULT_JOBS
    )
    size_v = pick("max_pull_size", "NEKKO_MAX_PULL_SIZE")
    max_pull_size = (
        parse_size(size_v, "--max-pull-size/NEKKO_MAX_PULL_SIZE")
        if size_v is not None
        else DEFAULT_MAX_PULL_SIZE
    )
    if not 0 < max_pull_size < 1 << 63:
        raise ConfigError(
            "--max-pull-size/NEKKO_MAX_PULL_SIZE must be more than 0 bytes and"
            f" less than 8 EiB, not {size_v!r}"
        )
    files_v = pick("max_pull_files", "NEKKO_MAX_PULL_FILES")
    max_pull_files = (
        parse_int(files_v, "--max-pull-files/NEKKO_MAX_PULL_FILES", 1, 10_000_000)
        if files_v is not None
        else DEFAULT_MAX_PULL_FILES
    )

    insecure = split_list(flags.get("insecure_registry")) or split_list(
        [_env(environ, "NEKKO_INSECURE_REGISTRIES") or ""]
    )
    mirrors: dict[str, list] = {}
    for item in split_list(flags.get("registry_mirror")) or split_list(
        [_env(environ, "NEKKO_REGISTRY_MIRRORS") or ""]
    ):
        reg, eq, url = item.partition("=")
        if not eq or not reg or not url:
            raise ConfigError(f"bad registry mirror {item!r}: want REGISTRY=MIRROR_URL")
        if "://" not in url:
            url = "https://" + url
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ConfigError(f"bad registry mirror URL {url!r}")
        mirrors.setdefault(reg.strip().lower(), []).append(url.rstrip("/"))

    hf_endpoint = (_env(environ, "HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    if urlsplit(hf_endpoint).scheme not in ("http", "https") or not urlsplit(hf_endpoint).netloc:
        raise ConfigError(f"HF_ENDPOINT must be an http(s) URL, not {hf_endpoint!r}")

    ca = pick("ca_cert", "SSL_CERT_FILE")
    if ca is not None and not os.path.isfile(str(ca)):
        raise ConfigError(f"CA bundle {ca} (--ca-cert/SSL_CERT_FILE) is not a readable file")

    cache = pick("cache_dir", "CACHE_DIR", "STORAGE_MANAGER_CACHE_DIR")
    if cache is not None:
        cache_dir = Path(str(cache)).expanduser()
        if need_cache and not _usable_dir(cache_dir):
            raise ConfigError(f"cache directory {cache_dir} cannot be created or written")
    else:
        cache_dir = Path(DEFAULT_CACHE_DIR)
        if not _usable_dir(cache_dir):
            import platformdirs  # only when the default is not usable: keeps start-up fast

            cache_dir = Path(platformdirs.user_cache_dir("nekko"))
            notes.append(f"{DEFAULT_CACHE_DIR} is not writable; using cache directory {cache_dir}")
            if need_cache and not _usable_dir(cache_dir):
                raise ConfigError(f"cache directory {cache_dir} cannot be created or written")

    proxies = {
        "HTTPS_PROXY": _env(environ, "HTTPS_PROXY", "https_proxy"),
        "HTTP_PROXY": _env(environ, "HTTP_PROXY", "http_proxy"),
    }
    for name, value in proxies.items():
        if value and urlsplit(value if "://" in value else "http://" + value).scheme not in (
            "http",
            "https",
        ):
            raise ConfigError(
                f"{name} must be an http:// or https:// proxy, not {value!r}"
                " (SOCKS is not supported)"
            )
    token_file = pick("api_token_file", "NEKKO_API_TOKEN_FILE")
    if token_file is not None:
        read_api_token(str(token_file))  # a bad file stops the start, not the first request
    egress = Policy.build(
        split_list(flags.get("deny_network"))
        or split_list([_env(environ, "NEKKO_DENY_NETWORKS") or ""]),
        split_list(flags.get("allow_network"))
        or split_list([_env(environ, "NEKKO_ALLOW_NETWORKS") or ""]),
    )
    verify = (
        str(pick("verify_cached_credentials", "NEKKO_VERIFY_CACHED_CREDENTIALS") or "always")
        .strip()
        .lower()
    )
    if verify not in ("always", "never"):
        raise ConfigError(
            f"--verify-cached-credentials must be 'always' or 'never', not {verify!r}"
        )
    discard = pick("discard_unpacked_layers", "NEKKO_DISCARD_UNPACKED_LAYERS")
    discard_b = parse_bool(discard, "--discard-unpacked-layers/NEKKO_DISCARD_UNPACKED_LAYERS")
    hf_token = _env(environ, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    if hf_token is not None and not (hf_token.isascii() and hf_token.strip().isprintable()):
        raise ConfigError("HF_TOKEN must be printable ASCII")
    endpoint = urlsplit(hf_endpoint)
    if (
        hf_token
        and endpoint.scheme == "http"
        and not _loopback(endpoint.hostname or "")
        and not {endpoint.netloc.lower(), (endpoint.hostname or "").lower()}
        & {h.lower() for h in insecure}
    ):
        raise ConfigError(
            f"HF_TOKEN would go in clear text to {hf_endpoint}: use https, or"
            f" allow it with --insecure-registry {endpoint.netloc}"
        )

    max_size = pick("max_cache_size", "NEKKO_MAX_CACHE_SIZE")
    max_cache_size = (
        parse_size(max_size, "--max-cache-size/NEKKO_MAX_CACHE_SIZE")
        if max_size is not None
        else None
    )
    free_v = pick("min_free_space", "NEKKO_MIN_FREE_SPACE")
    min_free, min_free_pct = (
        parse_free_space(free_v, "--min-free-space/NEKKO_MIN_FREE_SPACE")
        if free_v is not None
        else (None, None)
    )

    return Config(
        cache_dir=cache_dir.absolute(),
        address=address,
        verbose=verbose_n,
        platform=plat_s,
        insecure_registries=frozenset(h.lower() for h in insecure),
        jobs=jobs,
        hf_endpoint=hf_endpoint,
        hf_token=hf_token.strip() if hf_token else None,
        hf_token_repos=tuple(
            p.strip() for p in (_env(environ, "NEKKO_HF_TOKEN_REPOS") or "").split(",") if p.strip()
        ),
        registry_mirrors={k: tuple(v) for k, v in mirrors.items()},
        ca_cert=str(ca) if ca else None,
        https_proxy=proxies["HTTPS_PROXY"],
        http_proxy=proxies["HTTP_PROXY"],
        no_proxy=_env(environ, "NO_PROXY", "no_proxy"),
        max_pull_size=max_pull_size,
        max_pull_files=max_pull_files,
        api_token_file=str(Path(str(token_file)).absolute()) if token_file else None,
        egress=egress,
        verify_cached_credentials=verify,
        max_cache_size=max_cache_size,
        min_free_space=min_free,
        min_free_percent=min_free_pct,
        discard_unpacked_layers=discard_b,
        notes=tuple(notes),
    )
