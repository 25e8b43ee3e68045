"""`mirror ls`, `mirror pin` and `mirror rm` on hosted repositories (issue 11): ls lists
hosted repositories and their tags, marked hosted; pin refuses (hosted content is never
evicted); rm refuses a hosted name (DELETE and `mirror gc` remove hosted content) and a
pattern never reaches hosted repositories. A real mirror process caching the real
upstream registry and hosting ``myorg/*``; the commands run beside it."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.test_cli import cli
from tests.test_hosted_push import OCI_MANIFEST, push_manifest


@pytest.fixture
def both(make_mirror, upstream, image_set):
    """A mirror with a pushed hosted image (myorg/app:1) and a cached one."""
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": {"repositories": ["myorg/*"], "delete": True}})
    image = image_set.oci
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        body, digest = push_manifest(http, [os.urandom(4000)], repo="myorg/app", ref="1")
        r = http.get(f"/v2/{image.repo}/manifests/{image.tags[0]}")
        assert r.status_code == 200, r.text
    return mirror, image, body, digest


def still_served(mirror, body: bytes) -> bool:
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.get("/v2/myorg/app/manifests/1", headers={"Accept": OCI_MANIFEST})
        return r.status_code == 200 and r.content == body


def test_ls_lists_hosted_repositories_and_tags_marked_hosted(both):
    mirror, image, _, digest = both
    out = cli(mirror, "ls")
    assert out.returncode == 0, out.stderr
    [line] = [ln.split() for ln in out.stdout.splitlines() if "myorg/app" in ln]
    assert line[:3] == ["myorg/app", "(hosted)", "1"] and line[-1] == "-", out.stdout
    [cached] = [ln for ln in out.stdout.splitlines() if image.repo in ln]
    assert "hosted" not in cached
    rows = json.loads(cli(mirror, "ls", "--json").stdout)
    [row] = [r for r in rows if r["repository"] == "myorg/app"]
    assert row["hosted"] is True and row["name"] == "myorg/app" and row["tags"] == 1
    assert all(r["hosted"] is False for r in rows if r["repository"] != "myorg/app")

    out = cli(mirror, "ls", "myorg/app")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("myorg/app (hosted): 1 tag"), out.stdout
    assert lines[1].split() == ["TAG", "TYPE", "SIZE", "PUSHED", "DIGEST"], out.stdout
    [tag] = [ln.split() for ln in lines[2:] if digest in ln]
    assert tag[0] == "1"
    doc = json.loads(cli(mirror, "ls", "myorg/app", "--json").stdout)
    assert doc["hosted"] is True and doc["repository"] == "myorg/app"
    assert [t["tag"] for t in doc["tags"]] == ["1"] and doc["tags"][0]["digest"] == digest
    assert "ttl" not in doc["tags"][0]          # hosted tags never expire
    # a hosted name nothing was pushed to
    out = cli(mirror, "ls", "myorg/none")
    assert out.returncode == 1 and "nothing pushed to myorg/none (hosted)" in out.stderr


def test_pin_on_hosted_is_refused_saying_why(both):
    mirror, _, body, digest = both
    for ref in ("myorg/app:1", f"myorg/app@{digest}"):
        out = cli(mirror, "pin", ref)
        assert out.returncode == 1, out.stdout
        assert out.stderr.strip() == (f"mirror: {ref} is hosted: hosted content is never "
                                      "evicted; nothing to pin")
    assert "pins:" not in cli(mirror, "ls", "myorg/app").stdout
    assert still_served(mirror, body)


def test_rm_on_hosted_is_refused_and_patterns_skip_hosted(both):
    mirror, image, body, digest = both
    for ref in ("myorg/app:1", f"myorg/app@{digest}", "myorg/app:*"):
        out = cli(mirror, "rm", ref)
        assert out.returncode == 1, out.stdout
        assert out.stderr.strip() == (f"mirror: {ref} is hosted: remove it with DELETE "
                                      "(hosted.delete) and mirror gc")
    out = cli(mirror, "invalidate", "myorg/app:1")
    assert out.returncode == 1
    assert out.stderr.strip() == ("mirror: myorg/app:1 is hosted: hosted tags never expire; "
                                  "nothing to invalidate")
    # a pattern removes cached content only
    out = cli(mirror, "rm", "*")
    assert out.returncode == 0, out.stderr
    assert f"up/{image.repo}:{image.tags[0]}" in out.stdout and "myorg" not in out.stdout
    assert still_served(mirror, body)
    assert cli(mirror, "ls", "myorg/app").returncode == 0
    # nothing but hosted content matches: nothing cached matches
    out = cli(mirror, "rm", "myorg/*")
    assert out.returncode == 1 and "nothing cached matches 'myorg/*'" in out.stderr
    assert still_served(mirror, body)
