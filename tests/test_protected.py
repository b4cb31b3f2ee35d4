"""A cached private model is not a public one (issue 14 items 1 and 4, DESIGN section 10).

Team A pulls its private image (or gated model, or file behind a password) with credentials;
team B asks the same node for the same URL without them, with wrong ones, or with other
valid ones. Only callers the upstream would let fetch it now get the entry, and the check
costs one cheap upstream question, remembered for a while per credential.
"""

from __future__ import annotations

import base64
import functools
import os

import pytest
from peers.fakehub import GOOD_TOKEN, NOACCESS_TOKEN, start_fakehub
from peers.nginx import BASIC_PASSWORD, BASIC_USER, BEARER_TOKEN
from peers.registry import ALICE_TOKEN, CREDENTIALS

from nekko_sm.access import A_PROTECTED
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    Forbidden,
    NekkoError,
    Unauthorized,
    UpstreamNotFound,
    UpstreamUnavailable,
)

BASIC = Credentials.make(
    base64.b64encode(f"{CREDENTIALS[0]}:{CREDENTIALS[1]}".encode()).decode(), "Basic"
)
WRONG = Credentials.make(base64.b64encode(b"alice:wrong").decode(), "Basic")


@pytest.fixture
def make(make):
    """conftest's make, with two attempts 0.01 s apart."""
    return functools.partial(make, transfer={"backoff": 0.01, "attempts": 2})


def _refused(fn) -> NekkoError:
    with pytest.raises((Unauthorized, Forbidden, UpstreamNotFound)) as e:
        fn()
    assert "path" not in str(e.value.to_json())
    return e.value


# -- registries ---------------------------------------------------------------------------


def test_private_image_is_refused_without_or_with_wrong_credentials(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    _entry, created = svc.pull(info.url, BASIC)
    assert created
    assert svc.store.get_entry(info.url).annotations[A_PROTECTED] == "credentials"
    assert BASIC.header not in str(svc.store.get_entry(info.url).annotations)

    areg.clear()
    err = _refused(lambda: svc.pull(info.url))
    assert err.status == 401
    assert info.digest not in err.message  # a refused caller learns nothing of the content
    _refused(lambda: svc.pull(info.url, WRONG))
    assert not [r for r in areg.requests if "/blobs/" in r.path]  # nothing was downloaded


def test_other_valid_credentials_need_only_a_manifest_head(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    svc.pull(info.url, BASIC)
    areg.clear()
    entry, created = svc.pull(info.url, Credentials.make(ALICE_TOKEN))  # the PAT
    assert not created and entry["digest"] == info.digest and entry["path"]
    asked = [(r.method, r.path) for r in areg.requests if r.path != "/v2/"]
    assert asked == [("HEAD", f"/v2/{info.repo}/manifests/{info.digest}")], asked
    # Confirmed: the same credentials again within 15 minutes ask nothing.
    areg.clear()
    svc.pull(info.url, Credentials.make(ALICE_TOKEN))
    svc.pull(info.url, BASIC)  # the puller's own credentials were remembered at the pull
    assert areg.requests == []


def test_public_image_asked_again_costs_no_request(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["public/single:v1"]
    svc.pull(info.url)
    assert A_PROTECTED not in svc.store.get_entry(info.url).annotations
    areg.clear()
    areg.token_server.clear()
    assert svc.pull(info.url)[1] is False
    assert svc.pull(info.url, WRONG)[1] is False  # anonymous content: nothing to prove
    assert areg.requests == [] and areg.token_server.requests == []


def test_never_restores_the_old_behaviour(make, areg, auth_seeded):
    svc = make(areg.host, verify_cached_credentials="never")
    info = auth_seeded["private/single:v1"]
    svc.pull(info.url, BASIC)
    areg.clear()
    entry, created = svc.pull(info.url)
    assert not created and entry["path"]
    assert areg.requests == []


def test_registry_down_during_the_check_hands_out_nothing(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    svc.pull(info.url, BASIC)
    with areg.configured(fail_with=503), pytest.raises(UpstreamUnavailable) as e:
        svc.pull(info.url, Credentials.make(ALICE_TOKEN))
    assert e.value.status == 502 and "could not confirm" in e.value.message
    assert "path" not in str(e.value.to_json())
    assert svc.pull(info.url, Credentials.make(ALICE_TOKEN))[0]["path"]  # up again: fine


def test_removing_forgets_confirmations(make, areg, auth_seeded):
    svc = make(areg.host)
    info = auth_seeded["private/single:v1"]
    svc.pull(info.url, BASIC)
    svc.remove(info.url)
    _refused(lambda: svc.pull(info.url))
    assert svc.store.entries() == []


# -- the Hub ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    h = start_fakehub()
    h.add_repo(
        "acme/private",
        files={"config.json": b'{"secret": 1}', "model.gguf": b"GGUF" + os.urandom(8000)},
        private=True,
    )
    h.add_repo("acme/gated", files={"weights.bin": os.urandom(6000)}, gated=True)
    h.add_repo("acme/open", files={"readme.md": b"# open\n"})
    yield h
    h.close()


def test_private_hub_repo(make, hub):
    svc = make(env={"HF_ENDPOINT": hub.endpoint})
    url = "hf:///acme/private"
    entry, _ = svc.pull(url, Credentials.make(GOOD_TOKEN))
    key = entry["url"]
    assert svc.store.get_entry(key).annotations[A_PROTECTED] == "credentials"
    hub.clear_log()
    _refused(lambda: svc.pull(url))
    _refused(lambda: svc.pull(url, Credentials.make(NOACCESS_TOKEN)))
    assert not hub.log("cdn")  # no byte was downloaded for the refused callers
    assert all(r.method == "HEAD" for r in hub.log())
    entry, created = svc.pull(url, Credentials.make(GOOD_TOKEN))
    assert not created and entry["path"]


def test_gated_file_with_a_token_without_access_is_forbidden(make, hub):
    svc = make(env={"HF_ENDPOINT": hub.endpoint})
    url = "hf:///acme/gated/weights.bin"
    svc.pull(url, Credentials.make(GOOD_TOKEN))
    err = _refused(lambda: svc.pull(url, Credentials.make(NOACCESS_TOKEN)))
    assert err.status == 403


def test_the_nodes_own_token_protects_what_it_fetched(make, hub):
    """HF_TOKEN pulled it: a caller without credentials gets it only as a pull would (with
    HF_TOKEN), so the check is made with the node's token, once."""
    svc = make(env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": GOOD_TOKEN})
    entry, _ = svc.pull("hf:///acme/private/config.json")
    assert svc.store.get_entry(entry["url"]).annotations[A_PROTECTED] == "node"
    assert svc.pull("hf:///acme/private/config.json")[0]["path"]
    # another caller's own token that has no access is refused even though HF_TOKEN has
    _refused(lambda: svc.pull("hf:///acme/private/config.json", Credentials.make(NOACCESS_TOKEN)))


# -- http -----------------------------------------------------------------------------------


@pytest.fixture
def hsvc(make):
    return make()


def test_file_behind_bearer(hsvc, nginx):
    url = nginx.put("prot/weights.bin", os.urandom(5000)).replace("/files/", "/bearer/")
    hsvc.pull(url, Credentials.make(BEARER_TOKEN))
    err = _refused(lambda: hsvc.pull(url))
    assert err.status == 401
    _refused(lambda: hsvc.pull(url, Credentials.make("not-the-token")))
    nginx.clear_log()
    assert hsvc.pull(url, Credentials.make(BEARER_TOKEN))[1] is False
    assert nginx.requests_for("prot/weights.bin") == []  # the puller's access is remembered


def test_file_behind_basic_in_userinfo(hsvc, nginx):
    plain = nginx.put("prot/basic.bin", os.urandom(3000)).replace("/files/", "/basic/")
    with_pw = plain.replace("http://", f"http://{BASIC_USER}:{BASIC_PASSWORD}@")
    entry, _ = hsvc.pull(with_pw)
    assert entry["url"] == plain
    _refused(lambda: hsvc.pull(plain))
    assert hsvc.pull(with_pw)[1] is False


def test_signed_url_entry_is_checked_with_the_callers_own_signature(hsvc, nginx):
    url = nginx.put("prot/signed.bin", os.urandom(2000))
    hsvc.pull(url + "?X-Amz-Signature=aaa&X-Amz-Credential=k")
    key = hsvc.canonical(url)
    assert hsvc.store.get_entry(key).annotations[A_PROTECTED] == "signed"
    nginx.clear_log()
    hsvc.pull(url + "?X-Amz-Signature=bbb&X-Amz-Credential=k")  # another signature: asked
    asked = nginx.requests_for("prot/signed.bin")
    assert [r["method"] for r in asked] == ["HEAD"], asked


def test_joining_a_protected_pull_proves_access(hsvc, faulty):
    data = os.urandom(200 << 10)
    url = faulty.add(
        "prot/slow.bin", data, require_auth="Bearer right", stall_after=1024, stall_seconds=1.0
    )
    owner, _ = hsvc.start(url, Credentials.make("right"))
    stranger, _ = hsvc.start(url)
    friend, _ = hsvc.start(url, Credentials.make("right"))
    assert owner.future.result(timeout=30)[0]["path"]
    with pytest.raises(Unauthorized):
        stranger.future.result(timeout=30)
    assert friend.future.result(timeout=30)[0]["path"]
    gets = [r for r in faulty.requests_for("prot/slow.bin") if r.method == "GET"]
    assert len(gets) == 1  # one download; the stranger's check was a HEAD


def test_the_nodes_token_is_used_only_for_the_repos_it_is_allowed_for(make, hub):
    """Issue 14 item 5: NEKKO_HF_TOKEN_REPOS limits HF_TOKEN to the repositories it names;
    for any other, a caller without credentials is anonymous (a private repo's existence is
    not revealed by the node's access)."""
    svc = make(
        env={
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": GOOD_TOKEN,
            "NEKKO_HF_TOKEN_REPOS": "acme/open*, other/*",
        }
    )
    entry, _ = svc.pull("hf:///acme/open/readme.md")
    assert svc.store.get_entry(entry["url"]).annotations[A_PROTECTED] == "node"
    hub.clear_log()
    _refused(lambda: svc.pull("hf:///acme/private/config.json"))
    assert hub.log() and not any(r.has_authorization for r in hub.log())
    # the caller's own token still works for it
    assert svc.pull("hf:///acme/private/config.json", Credentials.make(GOOD_TOKEN))[0]["path"]
