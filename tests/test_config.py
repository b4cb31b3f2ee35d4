"""Configuration: flag > environment > default, fallbacks and fail-fast (DESIGN section 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nekko_sm import config as cfg
from nekko_sm.cli import main
from nekko_sm.cli_parser import normalise_verbose
from nekko_sm.errors import ConfigError, InvalidPlatform


def build(flags=None, env=None, **kw):
    return cfg.build(flags or {}, env or {}, **kw)


def test_defaults(tmp_path):
    c = build(env={"CACHE_DIR": str(tmp_path)})
    assert c.address == cfg.Address("tcp", "localhost", 8050)
    assert c.verbose == 0 and c.jobs == cfg.DEFAULT_JOBS and c.platform == ""
    assert c.hf_endpoint == "https://huggingface.co"


def test_flag_beats_env_beats_default(tmp_path):
    env = {"CACHE_DIR": str(tmp_path / "env"), "NEKKO_ADDRESS": "127.0.0.1:9000", "VERBOSE": "1"}
    c = build({"cache_dir": str(tmp_path / "flag"), "verbose": "2"}, env)
    assert c.cache_dir == tmp_path / "flag" and c.verbose == 2
    assert c.address.port == 9000


def test_storage_manager_fallbacks(tmp_path):
    env = {
        "STORAGE_MANAGER_CACHE_DIR": str(tmp_path / "sm"),
        "STORAGE_MANAGER_ADDRESS": "/run/x.sock",
        "STORAGE_MANAGER_VERBOSE": "3",
    }
    c = build(env=env)
    assert c.cache_dir == tmp_path / "sm" and c.address.kind == "unix" and c.verbose == 3
    env["CACHE_DIR"] = str(tmp_path / "new")
    assert build(env=env).cache_dir == tmp_path / "new"


@pytest.mark.parametrize(
    "text, want",
    [
        ("localhost:8050", ("tcp", "localhost", 8050, "")),
        ("0.0.0.0:8050", ("tcp", "0.0.0.0", 8050, "")),
        (":8050", ("tcp", "0.0.0.0", 8050, "")),
        ("[::1]:8050", ("tcp", "::1", 8050, "")),
        ("unix:/run/nekko.sock", ("unix", "", 0, "/run/nekko.sock")),
        ("/run/nekko.sock", ("unix", "", 0, "/run/nekko.sock")),
    ],
)
def test_addresses(text, want):
    a = cfg.parse_address(text)
    assert (a.kind, a.host, a.port, a.path) == want


@pytest.mark.parametrize("text", ["localhost", "host:99999", "host:-1", "unix:", "[::1]"])
def test_bad_addresses(text):
    with pytest.raises(ConfigError):
        cfg.parse_address(text)


@pytest.mark.parametrize(
    "argv, want",
    [
        (["-v"], ["--verbose=1"]),
        (["-vv"], ["--verbose=2"]),
        (["-v=2"], ["--verbose=2"]),
        (["-v3"], ["--verbose=3"]),
        (["--verbose", "2"], ["--verbose", "2"]),
        (["pull", "--", "-v"], ["pull", "--", "-v"]),
    ],
)
def test_verbose_spellings(argv, want):
    assert normalise_verbose(argv) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/armv6l", "linux/arm/v6"),
        ("Linux/AMD64", "linux/amd64"),
    ],
)
def test_platforms(text, want):
    assert str(cfg.parse_platform(text)) == want


@pytest.mark.parametrize("text", ["linux", "linux/sparc", "beos/amd64", "a/b/c/d", "/amd64"])
def test_bad_platforms(text):
    with pytest.raises(InvalidPlatform):
        cfg.parse_platform(text)


def test_platform_all_and_default(tmp_path):
    assert build({"platform": "ALL"}, {"CACHE_DIR": str(tmp_path)}).default_platform is None
    assert build(env={"CACHE_DIR": str(tmp_path)}).default_platform == cfg.host_platform()


def test_lists_and_mirrors(tmp_path):
    c = build(
        {"insecure_registry": ["a:5000", "b"], "registry_mirror": ["docker.io=mirror.local:5000"]},
        {"CACHE_DIR": str(tmp_path), "NEKKO_INSECURE_REGISTRIES": "ignored"},
    )
    assert c.insecure_registries == {"a:5000", "b"} and c.is_insecure("b:443")
    assert c.registry_mirrors == {"docker.io": ("https://mirror.local:5000",)}
    c = build(
        env={
            "CACHE_DIR": str(tmp_path),
            "NEKKO_INSECURE_REGISTRIES": "x, y",
            "NEKKO_REGISTRY_MIRRORS": "r.io=http://m1,r.io=http://m2",
        }
    )
    assert c.insecure_registries == {"x", "y"}
    assert c.registry_mirrors == {"r.io": ("http://m1", "http://m2")}


@pytest.mark.parametrize(
    "flags, env",
    [
        ({"jobs": "0"}, {}),
        ({"jobs": "many"}, {}),
        ({}, {"NEKKO_JOBS": "1000"}),
        ({"verbose": "9"}, {}),
        ({"registry_mirror": ["nomirror"]}, {}),
        ({"ca_cert": "/nonexistent"}, {}),
        ({}, {"HF_ENDPOINT": "ftp://x"}),
        ({}, {"HTTPS_PROXY": "socks5://127.0.0.1:1080"}),
        ({}, {"https_proxy": "socks5h://p:1"}),
        ({}, {"HF_TOKEN": "hf_\u20ac"}),
    ],
)
def test_bad_values_fail_fast(tmp_path, flags, env):
    with pytest.raises((ConfigError, InvalidPlatform)):
        build(flags, {"CACHE_DIR": str(tmp_path), **env})


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created"):
        build({"cache_dir": str(blocker / "sub")})


def test_default_cache_falls_back_to_user_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(cfg, "DEFAULT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    c = build()
    assert c.cache_dir == tmp_path / "xdg" / "nekko"
    assert any("not writable" in n for n in c.notes)


def test_cli_bad_value_exits_2(tmp_path, capsys):
    assert main(["--cache-dir", str(tmp_path), "--platform", "linux/sparc", "ls"]) == 2
    err = capsys.readouterr().err
    assert "sparc" in err and err.count("\n") == 1
    assert main(["--cache-dir", str(tmp_path), "--jobs", "0", "ls"]) == 2


def test_global_options_after_the_command(tmp_path, capsys):
    assert main(["ls", "--cache-dir", str(tmp_path), "-vv"]) == 0
    assert Path(tmp_path, "oci-layout").exists()


@pytest.mark.parametrize(
    "endpoint, insecure, ok",
    [
        ("http://hub.internal:8080", [], False),  # clear text over the network: refused
        ("http://hub.internal:8080", ["hub.internal:8080"], True),  # the operator said so
        ("http://hub.internal:8080", ["hub.internal"], True),
        ("http://127.0.0.1:9000", [], True),  # never leaves the machine
        ("http://localhost:9000", [], True),
        ("http://[::1]:9000", [], True),
        ("https://hub.internal", [], True),
    ],
)
def test_hf_token_is_not_sent_in_clear_text_without_an_opt_in(tmp_path, endpoint, insecure, ok):
    """Issue 9, finding 9: HF_TOKEN went to an http:// HF_ENDPOINT without a word."""
    flags = {"cache_dir": str(tmp_path), "insecure_registry": insecure}
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_secret"}
    if ok:
        assert cfg.build(flags, env).hf_token == "hf_secret"
    else:
        with pytest.raises(ConfigError, match="clear text") as e:
            cfg.build(flags, env)
        assert "hf_secret" not in e.value.message
    cfg.build(flags, {"HF_ENDPOINT": endpoint})  # without a token any endpoint is fine
