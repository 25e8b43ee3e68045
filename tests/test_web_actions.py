"""The web page's actions (pin, unpin, invalidate, remove, delete) and logins, over a
real socket against a mirror process that pulled real images through a real upstream
registry: who may act (read-only without logins unless ``ui.admin: open``; with logins,
the ACL), the login form and its cookie, CSRF, and that each action does what the CLI
does (checked with the CLI and the upstream's request log)."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from urllib.parse import unquote

import httpx
import pytest

from mirror.passwords import hash_password
from mirror.web.session import SESSION_TTL, make_session
from tests.support.keys import on_site, signing_key
from tests.test_cli import ok_json, on_disk
from tests.test_hosted_push import push_manifest as push_hosted
from tests.test_pull_through import get_manifest, hub_config, pull

USERS = {"alice": "wonderland", "bob": "builder"}
ACL = [
    {"match": {"account": "alice"}, "actions": ["*"]},
    {"match": {"account": "bob", "name": "docker.io/library/*"}, "actions": ["pull"]},
]
HUB = "docker.io"


def page_client(mirror, **kw) -> httpx.Client:
    """A browser-like client: same-origin POSTs, cookies kept, redirects not followed."""
    headers = {"Origin": mirror.url, **kw.pop("headers", {})}
    return httpx.Client(base_url=mirror.url, timeout=60, headers=headers, **kw)


def hidden(html: str) -> dict[str, str]:
    return {m.group(1): m.group(2).replace("&amp;", "&") for m in
            re.finditer(r'<input type="hidden" name="([a-z]+)" value="([^"]*)"', html)}


def target(image, upstream=HUB, reference=None) -> dict[str, str]:
    return {"upstream": upstream, "repository": image.repo,
            "reference": reference or image.tags[0]}


def confirm(client, action: str, fields: dict, next_: str = "/ui/somewhere") -> dict:
    """GET the confirmation page; the form it would post."""
    r = client.get(f"/ui/actions/{action}", params={**fields, "next": next_})
    assert r.status_code == 200, r.text
    form = hidden(r.text)
    assert form["confirm"] == "yes" and form["csrf"]
    return form


def act(client, action: str, fields: dict, next_: str = "/ui/somewhere") -> httpx.Response:
    return client.post(f"/ui/actions/{action}", data=confirm(client, action, fields, next_))


def flashed(client) -> str:
    return unquote(client.cookies.get("mirror_flash") or "")


def pins(mirror, image) -> list[str]:
    return ok_json(mirror, "ls", f"{HUB}/{image.repo}")["pins"]


def login(client, user: str, password: str) -> httpx.Response:
    return client.post("/ui/login", data={"user": user, "password": password,
                                          "next": "/ui/repositories"})


@pytest.fixture
def open_mirror(make_mirror, upstream, image_set):
    return make_mirror(hub_config(upstream, ui={"admin": "open"}))


@pytest.fixture
def users_mirror(make_mirror, upstream, image_set, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in USERS.items()))
    return make_mirror(hub_config(upstream, auth={"htpasswd": str(htpasswd),
                                                  "anonymous": "none", "acl": ACL}))


def test_without_logins_the_page_is_read_only(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    image = image_set.docker
    with httpx.Client(base_url=mirror.url, timeout=60) as registry:
        pull(registry, image)
    with page_client(mirror) as client:
        r = client.get("/ui/actions/pin", params=target(image))
        assert r.status_code == 403 and "read-only" in r.text
        assert 'name="csrf"' not in r.text
        r = client.post("/ui/actions/pin", data={**target(image), "csrf": "x" * 32,
                                                 "confirm": "yes", "next": "/ui/"})
        assert r.status_code == 403
    assert pins(mirror, image) == []
    if on_site(mirror):                  # the site's key, in PostgreSQL: no file
        assert not (mirror.data_dir / "ui.key").exists()
    else:
        assert (mirror.data_dir / "ui.key").stat().st_mode & 0o777 == 0o600
    # the server's local token may do everything
    local = "Bearer " + (mirror.data_dir / "local.token").read_text().strip()
    with page_client(mirror, headers={"Authorization": local}) as client:
        assert act(client, "pin", target(image)).status_code == 303
    assert pins(mirror, image) == [image.tags[0]]
    assert "mirror.web: local-token pin" in mirror.log_text()


def test_admin_open_pins_invalidates_and_removes(open_mirror, upstream, image_set):
    mirror, image = open_mirror, image_set.docker
    with httpx.Client(base_url=mirror.url, timeout=60) as registry, page_client(mirror) as client:
        pull(registry, image)

        r = act(client, "pin", target(image))
        assert r.status_code == 303 and r.headers["location"] == "/ui/somewhere"
        assert flashed(client).startswith(f"pinned {HUB}/{image.repo}:{image.tags[0]}")
        assert pins(mirror, image) == [image.tags[0]]
        listed = ok_json(mirror, "ls", f"{HUB}/{image.repo}")["tags"]
        assert {t["tag"]: t["pinned"] for t in listed}[image.tags[0]] is True
        # a pinned image is not removed
        r = client.get("/ui/actions/remove", params=target(image))
        assert r.status_code == 409 and "pinned" in r.text
        assert act(client, "unpin", target(image)).status_code == 303
        assert pins(mirror, image) == []

        # invalidate: the next pull of the tag asks upstream (HEAD) again
        mark = upstream.mark()
        assert get_manifest(registry, image.repo, image.tags[0]).status_code == 200
        assert upstream.requests(since=mark) == []            # fresh: served locally
        assert act(client, "invalidate", target(image)).status_code == 303
        mark = upstream.mark()
        assert get_manifest(registry, image.repo, image.tags[0]).status_code == 200
        seen = [(r.method, r.path.split("?")[0]) for r in upstream.requests(since=mark)]
        assert seen == [("HEAD", f"/v2/{image.repo}/manifests/{image.tags[0]}")]

        # remove by digest: the manifest, its tags and its blobs leave the cache
        assert image.digest in on_disk(mirror)
        form = confirm(client, "remove", target(image, reference=image.digest))
        page = client.get("/ui/actions/remove", params=target(image, reference=image.digest))
        assert "blob(s)" in page.text
        r = client.post("/ui/actions/remove", data=form)
        assert r.status_code == 303, r.text
        files = on_disk(mirror)
        assert image.digest not in files
        assert not {b.digest for b in image.blobs} & files.keys()
        assert ok_json(mirror, "ls")  == [] or all(
            row["repository"] != image.repo for row in ok_json(mirror, "ls"))
        mark = upstream.mark()
        pull(registry, image)                                   # fetched again, whole
        assert any(r.path.endswith(image.blobs[-1].digest) for r in upstream.requests(since=mark))
    log = mirror.log_text()
    assert re.search(rf"mirror.web: anonymous pin {HUB}/{re.escape(image.repo)}:", log), log
    assert "mirror.web: anonymous remove" in log


def test_bad_input_is_a_4xx_page_and_next_stays_on_this_server(open_mirror, image_set):
    mirror, image = open_mirror, image_set.docker
    with httpx.Client(base_url=mirror.url, timeout=60) as registry, page_client(mirror) as client:
        pull(registry, image)
        for action, params, status in [
                ("pin", {**target(image), "upstream": "nowhere.example"}, 404),
                ("pin", {**target(image), "repository": "UPPER/case"}, 400),
                ("pin", {**target(image), "repository": "../../etc"}, 400),
                ("pin", {**target(image), "reference": "../x"}, 400),
                ("pin", {**target(image), "reference": "sha256:abc"}, 400),
                ("invalidate", target(image, reference="sha256:" + "a" * 64), 400),
                ("invalidate", target(image, reference="missing"), 404),
                ("remove", target(image, reference="missing"), 404),
                ("delete", target(image), 400),           # nothing is hosted
                ("frobnicate", target(image), 404),
                ("unpin", target(image), 409)]:
            r = client.get(f"/ui/actions/{action}", params=params)
            assert r.status_code == status, (action, params, r.status_code, r.text[:300])
            assert "<html" in r.text
        r = client.get("/ui/actions/pin", params={**target(image),
                                                  "next": '/ui/"><script>alert(1)</script>'})
        assert r.status_code == 200 and "<script>alert" not in r.text
        csrf = confirm(client, "pin", target(image))["csrf"]
        for bad in ["https://evil.example/", "//evil.example/x", "/\\evil.example",
                    "javascript:alert(1)", "http:/ui"]:
            r = client.post("/ui/actions/pin", data={**target(image), "csrf": csrf,
                                                     "confirm": "yes", "next": bad})
            assert r.status_code == 303 and r.headers["location"] == "/ui/", bad
        r = client.post("/ui/actions/pin", content=b"\xff" * 10,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert 400 <= r.status_code < 500
        r = client.post("/ui/actions/pin", content=b"a=" + b"x" * 100_000,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert 400 <= r.status_code < 500
        r = client.post("/ui/actions/pin", data={**target(image), "csrf": csrf, "next": "/"})
        assert r.status_code == 400                       # not confirmed


def test_logins_cookie_csrf_and_acl(users_mirror, image_set):
    mirror, image, other = users_mirror, image_set.docker, image_set.oci
    alice_auth = ("alice", USERS["alice"])
    with httpx.Client(base_url=mirror.url, timeout=60, auth=alice_auth) as registry:
        pull(registry, image)
        pull(registry, other)
    with page_client(mirror) as alice, page_client(mirror) as bob, \
            page_client(mirror) as anonymous:
        # anonymous may do nothing; the login form is there
        assert anonymous.get("/ui/actions/pin", params=target(image)).status_code == 403
        r = anonymous.get("/ui/login", params={"next": "/ui/x"})
        assert r.status_code == 200 and 'name="password"' in r.text

        r = alice.post("/ui/login", data={"user": "alice", "password": USERS["alice"]},
                       headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "mirror_session" not in alice.cookies
        r = login(alice, "alice", "not-her-password")
        assert r.status_code == 401 and "wrong user name or password" in r.text
        assert "mirror_session" not in r.headers.get("set-cookie", "")
        r = login(alice, "alice", USERS["alice"])
        assert r.status_code == 303 and r.headers["location"] == "/ui/repositories"
        cookie = [c for c in r.headers.get_list("set-cookie") if c.startswith("mirror_session=")]
        assert cookie and "HttpOnly" in cookie[0] and "SameSite=Strict" in cookie[0], cookie
        assert "Max-Age=43200" in cookie[0]

        # CSRF: the token missing, wrong, or right but posted from another site: refused
        form = confirm(alice, "pin", target(image))
        for data, headers in [({k: v for k, v in form.items() if k != "csrf"}, {}),
                              ({**form, "csrf": "A" * 32}, {}),
                              (form, {"Origin": "https://evil.example"}),
                              (form, {"Origin": "null", "Referer": "https://evil.example/p"})]:
            r = alice.post("/ui/actions/pin", data=data, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.text, (data, headers)
        assert pins(mirror, image) == []
        # another session's token is not this one's
        login(bob, "bob", USERS["bob"])
        bobs = hidden(bob.get("/ui/actions/pin", params=target(image)).text)["csrf"]
        assert bobs != form["csrf"]
        assert alice.post("/ui/actions/pin", data={**form, "csrf": bobs}).status_code == 403
        assert pins(mirror, image) == []

        r = alice.post("/ui/actions/pin", data=form)
        assert r.status_code == 303, r.text
        assert pins(mirror, image) == [image.tags[0]]
        assert "mirror.web: alice pin" in mirror.log_text()

        # bob may pull library/* only: no action there, and org/team/app is refused in
        # the same words as a repository that does not exist
        r = bob.get("/ui/actions/unpin", params=target(image))
        assert r.status_code == 403
        r = bob.post("/ui/actions/unpin", data={**target(image), "csrf": bobs,
                                                "confirm": "yes", "next": "/ui/"})
        assert r.status_code == 403
        assert pins(mirror, image) == [image.tags[0]]
        hidden_repo = bob.get("/ui/actions/pin", params=target(other))
        missing = bob.get("/ui/actions/pin", params={**target(other), "repository": "no/such"})
        assert hidden_repo.status_code == missing.status_code == 403
        assert hidden_repo.text.replace(other.repo, "X") == missing.text.replace("no/such", "X")
        r = bob.post("/ui/actions/pin", data={**target(other), "csrf": bobs, "confirm": "yes",
                                              "next": "/ui/"})
        assert r.status_code == 403
        assert ok_json(mirror, "ls", f"{HUB}/{other.repo}")["pins"] == []

        # the browser's Basic credentials identify a viewer too
        with page_client(mirror, auth=alice_auth) as basic:
            assert basic.get("/ui/actions/unpin", params=target(image)).status_code == 200
            assert act(basic, "unpin", target(image)).status_code == 303
        assert pins(mirror, image) == []

        # logout: CSRF-checked, then the cookie is gone
        assert alice.post("/ui/logout", data={"csrf": "wrong"}).status_code == 403
        r = alice.post("/ui/logout", data={"csrf": form["csrf"]})
        assert r.status_code == 303
        assert alice.get("/ui/actions/pin", params=target(image)).status_code == 403


def test_a_forged_or_expired_cookie_is_anonymous(users_mirror, image_set):
    mirror, image = users_mirror, image_set.docker
    with page_client(mirror) as client:
        login(client, "alice", USERS["alice"])
        value = client.cookies["mirror_session"]
        assert client.get("/ui/actions/pin", params=target(image)).status_code == 200
        payload, signature = value.split(".")
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert data["a"] == "alice"
        forged = base64.urlsafe_b64encode(json.dumps({**data, "e": data["e"] + 10 ** 6})
                                          .encode()).decode().rstrip("=")
        client.cookies.set("mirror_session", f"{forged}.{signature}")
        assert client.get("/ui/actions/pin", params=target(image)).status_code == 403
        # signed with the right key (data_dir/ui.key, or the site's), but 12 hours old
        key = signing_key(mirror, "ui")
        _, old = make_session(key, "alice", now=time.time() - SESSION_TTL - 1)
        client.cookies.set("mirror_session", old)
        assert client.get("/ui/actions/pin", params=target(image)).status_code == 403
        _, fresh = make_session(key, "alice")
        client.cookies.set("mirror_session", fresh)
        assert client.get("/ui/actions/pin", params=target(image)).status_code == 200


def test_delete_a_hosted_tag_and_manifest(make_mirror):
    mirror = make_mirror({"upstreams": {}, "ui": {"admin": "open"},
                          "hosted": {"repositories": ["*"], "delete": True}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http, page_client(mirror) as client:
        body, digest = push_hosted(http, [os.urandom(3000)], ref="v1")
        assert http.put("/v2/team/app/manifests/v2", content=body, headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json"}).status_code == 201
        hosted = {"upstream": "", "repository": "team/app"}
        assert client.get("/ui/actions/pin", params={**hosted, "reference": "v1"}
                          ).status_code == 400          # hosted content is not pinned
        r = act(client, "delete", {**hosted, "reference": "v1"})
        assert r.status_code == 303 and flashed(client) == "deleted team/app:v1"
        assert http.get("/v2/team/app/manifests/v1").status_code == 404
        assert http.get("/v2/team/app/manifests/v2").status_code == 200
        assert act(client, "delete", {**hosted, "reference": digest}).status_code == 303
        assert http.get("/v2/team/app/manifests/v2").status_code == 404
        assert http.get(f"/v2/team/app/manifests/{digest}").status_code == 404
        r = client.get("/ui/actions/delete", params={**hosted, "reference": digest})
        assert r.status_code == 404


def test_hosted_delete_disabled_is_refused(make_mirror):
    mirror = make_mirror({"upstreams": {}, "ui": {"admin": "open"},
                          "hosted": {"repositories": ["*"]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http, page_client(mirror) as client:
        push_hosted(http, [os.urandom(300)], ref="v1")
        r = client.get("/ui/actions/delete", params={"upstream": "", "repository": "team/app",
                                                     "reference": "v1"})
        assert r.status_code == 405 and "hosted.delete" in r.text
        assert http.get("/v2/team/app/manifests/v1").status_code == 200


def test_a_session_and_its_token_hold_on_every_worker(make_mirror, upstream, image_set,
                                                      tmp_path):
    """``workers: 2``: the session key is in the data directory, so a login made through
    one worker is known to the other, and its CSRF token is the same on both."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in USERS.items()))
    mirror = make_mirror(hub_config(upstream, workers=2, auth={
        "htpasswd": str(htpasswd), "anonymous": "none", "acl": ACL}))
    deadline = time.monotonic() + 30
    while "ready on http" not in mirror.log_text():
        assert time.monotonic() < deadline, mirror.log_text()
        time.sleep(0.05)
    image = image_set.docker
    with page_client(mirror) as alice:
        assert login(alice, "alice", USERS["alice"]).status_code == 303
        cookies = dict(alice.cookies)
    tokens, statuses = set(), []

    def one() -> None:
        with page_client(mirror, cookies=cookies, headers={"Connection": "close"}) as c:
            r = c.get("/ui/actions/pin", params=target(image))
            statuses.append(r.status_code)
            tokens.add(hidden(r.text).get("csrf"))

    for _ in range(3):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        served = set(re.findall(r"\[(w\d+)\] mirror\.access: .*\"GET /ui/actions/pin",
                                mirror.log_text()))
        if served == {"w0", "w1"}:
            break
    assert served == {"w0", "w1"}, mirror.log_text()[-2000:]
    assert set(statuses) == {200} and len(tokens) == 1 and None not in tokens
    keys = list(mirror.data_dir.glob("*ui.key*"))
    # one key, no temp files left (a site's key is in PostgreSQL: no file at all)
    assert [k.name for k in keys] == ([] if on_site(mirror) else ["ui.key"])


def test_ui_admin_config(tmp_path):
    from mirror.config import ConfigError, describe, load_config

    path = tmp_path / "config.yml"
    assert load_config(None, environ={}).ui.admin == "acl"
    assert load_config(None, environ={"MIRROR_UI_ADMIN": "open"}).ui.admin == "open"
    for text, says in [("ui: {admin: yes}", "ui.admin: expected acl or open, got 'True'"),
                       ("ui: {admin: everyone}", "ui.admin: expected acl or open"),
                       ("ui: {admins: open}", "ui.admins: unknown key"),
                       ("ui: open", "ui: expected a mapping")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={})
        assert says in str(caught.value) and "\n" not in str(caught.value), text
    path.write_text("ui: {admin: OPEN}")
    config = load_config(path, environ={})
    assert describe(config)["ui"] == {"admin": "open"}


def test_invalidate_reaches_every_worker(make_mirror, faulty_upstream, image_set):
    """``workers: 2``: a tag invalidated on the page through one worker is stale on the
    other too. With the upstream down each worker then serves it stale (and says so)
    instead of from its own fresh copy: no revalidation by one can hide the other's view."""
    image = image_set.docker
    mirror = make_mirror({"workers": 2, "ui": {"admin": "open"}, "upstreams": {
        HUB: {"url": faulty_upstream.url, "tag_ttl": "1h", "retries": 0}}})
    deadline = time.monotonic() + 30
    while "ready on http" not in mirror.log_text():
        assert time.monotonic() < deadline, mirror.log_text()
        time.sleep(0.05)
    with httpx.Client(base_url=mirror.url, timeout=60) as registry:
        pull(registry, image)
    # at once, on both workers: the one that did not cache it knows of it too
    for _ in range(12):
        with page_client(mirror, headers={"Connection": "close"}) as client:
            r = client.get("/ui/actions/invalidate", params=target(image))
            assert r.status_code == 200, r.text
    with page_client(mirror) as client:
        assert act(client, "invalidate", target(image)).status_code == 303
    faulty_upstream.arm("status", path_contains="/manifests/", status=503, times=None)
    time.sleep(2.5)                      # each worker looks at the index every second
    path = f"/v2/{image.repo}/manifests/{image.tags[0]}"
    served: set[str] = set()
    since = len(mirror.log_text())          # the pull above was served too
    for _ in range(40):
        with httpx.Client(base_url=mirror.url, timeout=60,
                          headers={"Connection": "close"}) as fresh:
            assert get_manifest(fresh, image.repo, image.tags[0]).status_code == 200
        served = set(re.findall(rf"\[(w\d+)\] mirror\.access: .*\"GET {path}\"",
                                mirror.log_text()[since:]))
        if served == {"w0", "w1"}:
            break
    assert served == {"w0", "w1"}, mirror.log_text()[-3000:]
    stale = set(re.findall(rf"\[(w\d+)\] mirror\.proxy: serving stale "
                           rf"{HUB}/{re.escape(image.repo)}:{image.tags[0]}",
                           mirror.log_text()[since:]))
    assert stale == {"w0", "w1"}, mirror.log_text()[-3000:]
