"""Who is looking at the page and what they may do there.

``viewer(request)`` is what every page and action asks: the account (or anonymous),
whether it may pull a repository (what lists show) and act on it (what buttons
show, what actions accept), and the CSRF token its forms carry.

- Without logins (no ``auth:``) everyone sees everything; the page is read-only
  unless ``ui.admin: open``, which lets everyone act.
- With logins the page asks for the same users as the registry API (auth.py's Guard:
  the htpasswd file, the same throttle): ``/ui/login`` sets a session cookie, or the
  browser sends Basic credentials itself (``/ui/login?prompt=basic`` asks for them).
  A viewer sees what the ACL lets it pull; ``ui.admin: acl`` (the default) lets it act
  where the ACL allows the action's ACL action (``ACL_ACTION``: pin, unpin, invalidate
  need ``push``; remove and delete need ``delete``), ``ui.admin: open`` wherever it may
  pull. The local token (local_access.py) passes every check.
- The session cookie is ``<payload>.<HMAC-SHA256>`` under a key kept in
  ``data_dir/ui.key`` (made at first use, mode 0600, read by every worker; with several
  replicas, the site's key in PostgreSQL: signing_keys.py): nothing is stored per
  session, so every worker process (and replica) knows every session. HttpOnly,
  SameSite=Strict, Secure over TLS, 12 hours.
- CSRF: each form carries a token derived from the session (HMAC of its id), and
  every POST must carry it and come from this origin (``Origin``, else ``Referer``).

The ASGI wrapper ``SessionCookies`` sets the cookies ``viewer`` and ``take_flash``
decided on, on whatever response the page then gives.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import Guard, Identity
from ..config import Config
from ..errors import RegistryError
from ..models import HOSTED

log = logging.getLogger("mirror.web")

COOKIE = "mirror_session"
FLASH = "mirror_flash"
KEY_FILE = "ui.key"
SESSION_TTL = 12 * 3600
FORM_MAX = 64 * 1024

CACHED_ACTIONS = ("pin", "unpin", "invalidate", "remove")     # on a cached repository
HOSTED_ACTIONS = ("delete",)                                    # on a hosted one
ACL_ACTION = {"pin": "push", "unpin": "push", "invalidate": "push",
              "remove": "delete", "delete": "delete"}

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


# -- the key --------------------------------------------------------------------------------


def load_key(data_dir: Path) -> bytes:
    """The session key in ``data_dir/ui.key``, made now if missing (blocks: call it
    through fileio). Made as a temp file linked into place, so every worker reads the
    one the first of them made, whole."""
    path = Path(data_dir) / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    temp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        temp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text().strip()
    if len(text) < 32:
        raise OSError(f"{path}: too short to be a key; remove it and restart")
    return bytes.fromhex(text) if all(c in "0123456789abcdef" for c in text) else text.encode()


@dataclass(frozen=True)
class WebState:
    """What the page needs of the running mirror (app.state.web; built by app.py)."""

    config: Config
    key: bytes
    local: Any = None          # the server's LocalCache
    hosted: Any = None         # the HostedStore, None when nothing is hosted
    local_token: str | None = field(default=None, repr=False)    # local_access.py


def state(request: Request) -> WebState | None:
    return getattr(request.app.state, "web", None)


# -- sessions --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def make_session(key: bytes, account: str, now: float | None = None) -> tuple[str, str]:
    """A new session for ``account`` ("" anonymous): (its id, the cookie's value)."""
    sid = secrets.token_urlsafe(18)
    payload = _b64(json.dumps({"s": sid, "a": account,
                               "e": int((now or time.time()) + SESSION_TTL)}).encode())
    return sid, f"{payload}.{_sign(key, payload)}"


def read_session(key: bytes, value: str | None,
                 now: float | None = None) -> tuple[str, str] | None:
    """(session id, account) of a cookie this server signed and that has not expired."""
    if not value or len(value) > 4096 or value.count(".") != 1:
        return None
    payload, signature = value.split(".")
    if not hmac.compare_digest(signature, _sign(key, payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
        sid, account, expires = str(data["s"]), str(data["a"]), float(data["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires <= (now or time.time()):
        return None
    return sid, account


def csrf_token(key: bytes, sid: str) -> str:
    return _b64(hmac.new(key, b"csrf\0" + sid.encode(), hashlib.sha256).digest())[:32]


def _cookie(request: Request, name: str, value: str, max_age: int, path: str = "/") -> str:
    web = state(request)
    secure = request.url.scheme == "https" or \
        (web is not None and (web.config.public_url or "").startswith("https:"))
    return (f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


def _set_cookie(request: Request, header: str) -> None:
    request.scope.setdefault("mirror.set_cookie", []).append(header)


# -- the viewer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    account: str = ""                      # "" anonymous
    identity: Identity = field(default_factory=lambda: Identity(""))
    csrf: str = ""                         # the token forms carry; "" when it may not act
    admin: bool = False                    # may act at all (ACL permitting)
    guard: Guard | None = field(default=None, repr=False, compare=False)
    open: bool = False                     # ui.admin: open
    how: str = ""                          # "cookie", "basic", "local" or "" (anonymous)

    def may_pull(self, upstream: str, repository: str) -> bool:
        return self.guard is None or self.guard.may_list(self.identity, upstream, repository)

    def may(self, action: str, upstream: str, repository: str) -> bool:
        """``action``: pin, unpin, invalidate, remove (cached), delete (hosted)."""
        if not (self.admin and self.csrf) or action not in ACL_ACTION:
            return False
        if (upstream == HOSTED) != (action in HOSTED_ACTIONS):
            return False
        if self.identity.local:
            return True
        if not self.may_pull(upstream, repository):
            return False
        if self.open:
            return True
        return self.guard is not None and \
            self.guard.may(self.identity, ACL_ACTION[action], upstream, repository)

    @property
    def logged_in(self) -> bool:
        return bool(self.account)

    @property
    def name(self) -> str:
        """Who, as the log says it."""
        return self.account or ("local-token" if self.identity.local else "anonymous")


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


async def viewer(request: Request) -> Viewer:
    """Who sent ``request`` (once per request: the answer is kept in its scope)."""
    known = request.scope.get("mirror.viewer")
    if isinstance(known, Viewer):
        return known
    web = state(request)
    if web is None:
        return Viewer()
    registry = getattr(request.app.state, "registry", None)
    guard: Guard | None = getattr(registry, "guard", None)
    is_open = web.config.ui.admin == "open"
    session = read_session(web.key, request.cookies.get(COOKIE))
    identity, how, sid = Identity(""), "", session[0] if session else None
    authorization = request.headers.get("authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if web.local_token and scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), web.local_token.encode()):
        identity, how = Identity("", local=True), "local"
        sid = _b64(hmac.new(web.key, b"local\0" + value.strip().encode(),
                            hashlib.sha256).digest())
    elif guard is not None and session is not None and session[1]:
        identity, how = Identity(session[1]), "cookie"
    elif guard is not None:
        creds = guard.basic(authorization)
        if creds is not None and creds[0]:
            try:
                ok = await guard.login(creds[0], creds[1], _client(request))
            except RegistryError:      # throttled: anonymous for now
                ok = False
            if ok:
                identity, how = Identity(creds[0]), "basic"
                # The browser resends these credentials with every request: they are
                # the session (its id derived from them, never stored).
                sid = _b64(hmac.new(web.key, b"basic\0" + authorization.encode(),
                                    hashlib.sha256).digest())
    admin = is_open or guard is not None or identity.local
    if admin and sid is None:         # an anonymous visitor who may act: a session for it
        sid, value = make_session(web.key, "")
        _set_cookie(request, _cookie(request, COOKIE, value, SESSION_TTL))
    found = Viewer(identity.account, identity, csrf_token(web.key, sid) if admin and sid else "",
                   admin, guard, is_open, how)
    request.scope["mirror.viewer"] = found
    return found


def needs_login(request: Request, who: Viewer) -> Response | None:
    """For the pages: a redirect to the login form when logins are on, the viewer is
    anonymous and anonymous requests may pull nothing; else None."""
    if who.guard is None or who.logged_in or who.guard.acl.anonymous_can_pull():
        return None
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/ui/login?" + urlencode({"next": safe_next(target)}), 303)


# -- checks every POST makes --------------------------------------------------------------


def safe_next(value: str | None, default: str = "/ui/") -> str:
    """``value`` if it is a path on this server, else ``default``: never another site."""
    if not value or len(value) > 2000 or not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(c) < 0x21 or ord(c) > 0x7e for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def same_origin(request: Request) -> bool:
    """The POST came from a page of this server (``Origin``, else ``Referer``)."""
    sent = request.headers.get("origin")
    if not sent or sent == "null":
        referer = request.headers.get("referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        sent = f"{parts.scheme}://{parts.netloc}"
    ours = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    web = state(request)
    if web is not None and web.config.public_url:
        parts = urlsplit(web.config.public_url)
        ours.add(f"{parts.scheme}://{parts.netloc}")
    return sent.lower() in {o.lower() for o in ours}


def csrf_ok(request: Request, who: Viewer, form: dict[str, str]) -> bool:
    sent = form.get("csrf", "")
    return bool(who.csrf) and hmac.compare_digest(sent.encode(), who.csrf.encode()) \
        and same_origin(request)


async def read_form(request: Request) -> dict[str, str] | None:
    """An ``application/x-www-form-urlencoded`` body (the first value of each field);
    None if it is not one or is too big."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != \
            "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX:
            return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


# -- flash messages ---------------------------------------------------------------------------


def flash(request: Request, message: str) -> None:
    """A message for the next page this browser loads (a short-lived cookie)."""
    _set_cookie(request, _cookie(request, FLASH, quote(message[:300]), 120))


def take_flash(request: Request) -> str | None:
    """The message left for this page, if any (then gone)."""
    value = request.cookies.get(FLASH)
    if not value:
        return None
    _set_cookie(request, _cookie(request, FLASH, "", 0))
    return unquote(value)[:300]


def page(request: Request, template: str, context: dict[str, Any], status: int = 200,
         who: Viewer | None = None) -> Response:
    who = who or request.scope.get("mirror.viewer") or Viewer()
    return templates.TemplateResponse(
        request, template, {"viewer": who, "here": request.url.path,
                            "logins": who.guard is not None,
                            "flash": take_flash(request), **context}, status_code=status)


def error_page(request: Request, status: int, message: str) -> Response:
    return page(request, "confirm.html", {"error": message, "status": status,
                                          "next": "/ui/"}, status)


class SessionCookies:
    """Adds the cookies ``viewer``, ``flash`` and ``take_flash`` decided on to the
    response, whatever route made it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = scope.get("mirror.set_cookie")
                if headers:
                    message["headers"] = [*message.get("headers", []),
                                          *((b"set-cookie", h.encode("latin-1"))
                                            for h in headers)]
            await send(message)

        await self.app(scope, receive, sending)


# -- /ui/login and /ui/logout --------------------------------------------------------------


async def login(request: Request) -> Response:
    web = state(request)
    guard: Guard | None = getattr(getattr(request.app.state, "registry", None), "guard", None)
    if web is None or guard is None:
        return RedirectResponse("/ui/", 303)           # no logins: nothing to log in to
    if request.method == "GET":
        target = safe_next(request.query_params.get("next"))
        if request.query_params.get("prompt") == "basic":
            who = await viewer(request)
            if who.how == "basic":
                return RedirectResponse(target, 303)
            return Response("log in to see the mirror", 401, {
                "WWW-Authenticate": f'Basic realm="{guard.config.service}", charset="UTF-8"'})
        return page(request, "login.html", {"next": target, "error": None, "user": ""})
    form = await read_form(request)
    if form is None:
        return error_page(request, 400, "expected a login form")
    target = safe_next(form.get("next"))
    if not same_origin(request):
        return error_page(request, 403, "this form must be sent from this mirror's own page")
    user, password = form.get("user", "")[:256], form.get("password", "")[:1024]
    try:
        ok = await guard.login(user, password, _client(request))
    except RegistryError as exc:         # too many failures: the throttle's 429
        return page(request, "login.html", {"next": target, "error": exc.message,
                                            "user": user}, exc.status)
    if not ok:
        return page(request, "login.html", {"next": target, "user": user,
                                            "error": "wrong user name or password"}, 401)
    _, value = make_session(web.key, user)
    log.info("%s logged in to the web page from %s", user, _client(request) or "?")
    _set_cookie(request, _cookie(request, COOKIE, value, SESSION_TTL))
    return RedirectResponse(target, 303)


async def logout(request: Request) -> Response:
    who = await viewer(request)
    form = await read_form(request)
    if form is None or not csrf_ok(request, who, form):
        return error_page(request, 403, "refused: the form's CSRF token or origin is wrong")
    _set_cookie(request, _cookie(request, COOKIE, "", 0))
    if who.account:
        log.info("%s logged out of the web page", who.account)
    return RedirectResponse("/ui/login" if who.guard is not None else "/ui/", 303)


ROUTES = [
    Route("/ui/login", login, methods=["GET", "POST"]),
    Route("/ui/logout", logout, methods=["POST"]),
]

__all__ = ["ROUTES", "SessionCookies", "Viewer", "WebState", "csrf_ok", "error_page", "flash",
           "load_key", "needs_login", "page", "read_form", "safe_next", "take_flash", "viewer"]
