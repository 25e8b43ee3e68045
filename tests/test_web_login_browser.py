"""Logging in to the web page and pinning an image in a real headless browser:
Debian's chromium driven by Playwright (``executable_path``, no browser download),
against a mirror process with htpasswd logins that pulled an image through a real
upstream registry. Screenshots go to the test's tmp directory."""

from __future__ import annotations

import shutil
from urllib.parse import urlencode

import httpx
import pytest

from tests.test_cli import ok_json
from tests.test_pull_through import pull
from tests.test_web_actions import HUB, USERS, users_mirror  # noqa: F401  (a fixture)

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    """Headless chromium; needs ``apt-get install chromium`` and ``pip install playwright``."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends "
                    "chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install playwright (no browser download)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox"])
        yield browser
        browser.close()


def test_log_in_wrong_then_right_and_pin(users_mirror, image_set, browser, tmp_path):  # noqa: F811
    mirror, image = users_mirror, image_set.docker
    with httpx.Client(base_url=mirror.url, timeout=60, auth=("alice", USERS["alice"])) as c:
        pull(c, image)
    fields = {"upstream": HUB, "repository": image.repo, "reference": image.tags[0]}
    back = "/ui/actions/unpin?" + urlencode(fields)        # a page that shows the flash
    confirm = "/ui/actions/pin?" + urlencode({**fields, "next": back})
    page = browser.new_page()
    page.goto(f"{mirror.url}/ui/login?" + urlencode({"next": confirm}))

    page.fill("input[name=user]", "alice")
    page.fill("input[name=password]", "not-her-password")
    page.click("#login button[type=submit]")
    assert page.locator("#login-error").inner_text() == "wrong user name or password"
    page.screenshot(path=str(tmp_path / "login-wrong.png"))
    assert not [c for c in page.context.cookies() if c["name"] == "mirror_session"]

    page.fill("input[name=password]", USERS["alice"])
    page.click("#login button[type=submit]")
    page.wait_for_url(f"{mirror.url}{confirm}")
    cookie = next(c for c in page.context.cookies() if c["name"] == "mirror_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.locator("h1").inner_text() == f"Pin {HUB}/{image.repo}:{image.tags[0]}?"
    page.screenshot(path=str(tmp_path / "confirm-pin.png"))
    assert ok_json(mirror, "ls", f"{HUB}/{image.repo}")["pins"] == []

    page.click("#confirm button[type=submit]")
    page.wait_for_url(f"{mirror.url}{back}")
    assert page.locator(".flash").inner_text().startswith(
        f"pinned {HUB}/{image.repo}:{image.tags[0]}")
    page.screenshot(path=str(tmp_path / "pinned.png"))
    assert ok_json(mirror, "ls", f"{HUB}/{image.repo}")["pins"] == [image.tags[0]]
    assert "mirror.web: alice pin" in mirror.log_text()
