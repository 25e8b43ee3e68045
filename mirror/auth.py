"""Who may pull what: htpasswd users, Basic or Bearer-token logins, and ACL rules.

- ``Htpasswd``: bcrypt entries as ``htpasswd -B`` writes them, re-read when the
  file changes; a verified password is remembered briefly, so Basic auth on every
  request does not pay bcrypt every time. bcrypt runs on a small thread pool, never
  on the event loop, and an unknown user costs the same bcrypt as a known one.
- ``Throttle``: failed logins counted per user and per client address; past
  ``auth.max_failures`` within ``auth.failure_window`` the key is refused (429).
- ``Tokens``: short-lived HS256 JWTs shaped like Docker Hub's (``access`` claims of
  type/name/actions), signed with a key kept in the data directory.
- ``Acl``: docker_auth style rules, first match wins; names are matched as
  ``<upstream>/<repository>`` so one repository has one name whatever route
  (``?ns=``, path prefix, default) a client used.
- ``Guard``: what api.py calls: authenticate a request and check one action, or
  answer the token endpoint. Failing checks raise ``Unauthorized`` (with the
  challenge a client needs) or ``Denied``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import secrets
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from .config import AclRule, AuthConfig
from .errors import Denied, NameUnknown, NotFound, RegistryError, TooManyRequests, Unauthorized
from .fileio import run
from .models import validate_name
from .routing import Router

log = logging.getLogger("mirror.auth")

VERIFIED_TTL = 300.0          # seconds a verified password is remembered
LEEWAY = 10.0                 # clock skew allowed on token times
KEY_BYTES = 32                # the token signing key: at least this many random bytes
# bcrypt checks running at once (each holds a core), and waiting at most; past that a
# login is told to come back (429) instead of queueing without bound.
CHECKS_AT_ONCE = max(2, min(4, (os.cpu_count() or 2) // 2))
CHECKS_WAITING = 64
THROTTLE_KEYS = 10000         # user names and addresses with failures remembered


# -- htpasswd ------------------------------------------------------------------------------


def hash_password(password: str, rounds: int = 10) -> str:
    """A bcrypt hash in the ``$2y$`` form Apache's ``htpasswd -B`` writes."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
    return "$2y$" + hashed[4:]


def read_htpasswd(path: Path) -> dict[str, str]:
    users = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            users[user] = hashed
    return users


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(users.items())))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Htpasswd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, str] = {}
        self._mtime: int | None = None
        self._verified: dict[tuple[str, bytes], float] = {}
        self._dummy: dict[bytes, bytes] = {}        # bcrypt setting -> a hash of nothing
        self._pool = ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="bcrypt")
        self._slots = asyncio.Semaphore(CHECKS_AT_ONCE)
        self._waiting = 0

    def _read(self, known: int | None) -> tuple[int | None, dict[str, str] | None]:
        """(mtime, users) of the file, users None when unchanged (worker thread)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None, {}
        return mtime, (read_htpasswd(self.path) if mtime != known else None)

    async def _load(self) -> None:
        mtime, users = await run(self._read, self._mtime)
        if users is not None:
            self._users, self._mtime = users, mtime
            self._verified.clear()

    async def check(self, user: str, password: str) -> bool:
        await self._load()
        hashed = self._users.get(user)
        known = hashed is not None and hashed.startswith(("$2y$", "$2b$", "$2a$"))
        key = (user, hashlib.sha256(password.encode()).digest())
        if known and self._verified.get(key, 0) > time.monotonic():
            return True
        # An unknown user is checked against a hash of the same cost, so the answer
        # takes as long as for a real one: timing does not tell which users exist.
        target = hashed.encode() if known else self._dummy_for(self._cost())
        ok = await self._checkpw(password.encode(), target) and known
        if ok:
            self._verified[key] = time.monotonic() + VERIFIED_TTL
        return ok

    def _cost(self) -> bytes:
        """The bcrypt setting ($2b$NN) most users have: what a real check costs."""
        costs = [h[4:6] for h in self._users.values() if h[:4] in ("$2y$", "$2b$", "$2a$")]
        cost = max(set(costs), key=costs.count) if costs else "10"
        return f"$2b${cost}$".encode()

    def _dummy_for(self, setting: bytes) -> bytes:
        if setting not in self._dummy:
            rounds = int(setting[4:6]) if setting[4:6].isdigit() else 10
            try:
                salt = bcrypt.gensalt(min(max(rounds, 4), 31))
            except ValueError:
                salt = bcrypt.gensalt(10)
            # A hash nobody's password matches: its password is random and forgotten.
            # The salt alone fixes the cost, so making it costs nothing.
            self._dummy[setting] = salt + b"." * 31
        return self._dummy[setting]

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        if self._waiting >= CHECKS_WAITING:
            raise TooManyRequests("too many logins at once; try again shortly",
                                  headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            async with self._slots:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, _checkpw, password, hashed)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


class Throttle:
    """Failed logins per key (a user name, a client address). A key with ``limit``
    failures, or checks under way, within the last ``window`` seconds is refused
    until the oldest of them is ``window`` old. ``limit`` 0: never refuse."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def begin(self, keys: tuple[str, ...]) -> None:
        """Count a check starting for ``keys``, or raise TooManyRequests."""
        if not self.limit:
            return
        now = time.monotonic()
        for key in keys:
            times = self._recent(key, now)
            if len(times) + self._pending.get(key, 0) >= self.limit:
                wait = times[0] + self.window - now if times else 1.0
                raise TooManyRequests("too many failed logins; try again later",
                                      headers={"Retry-After": str(max(1, math.ceil(wait)))})
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, keys: tuple[str, ...], ok: bool) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        for key in keys:
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
            if not ok:
                if key not in self._failures and len(self._failures) >= THROTTLE_KEYS:
                    self._forget(now)
                self._failures.setdefault(key, deque(maxlen=self.limit)).append(now)

    def _forget(self, now: float) -> None:
        """Make room: drop keys with no recent failure, else the oldest key."""
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) >= THROTTLE_KEYS:
            del self._failures[min(self._failures, key=lambda k: self._failures[k][-1])]


# -- tokens ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WeakKey(Exception):
    """The token signing key file exists but is too short to trust."""


def load_key(path: Path) -> bytes:
    """The token signing key, made on first use: 32 random bytes, 0600, written to a
    temporary file, synced and renamed into place, so a crash or a full disk never
    leaves a short key behind. A shorter key (left by an older version) is refused."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        if len(key) < KEY_BYTES:
            raise WeakKey(f"{path}: the token signing key is {len(key)} bytes, at least "
                          f"{KEY_BYTES} are needed; remove the file and a new key is made "
                          f"(tokens issued so far become invalid)")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return key


@dataclass(frozen=True)
class Grant:
    kind: str          # "repository" or "registry"
    name: str
    actions: tuple[str, ...]


class Tokens:
    def __init__(self, key: bytes, issuer: str, service: str, ttl: float) -> None:
        self._key = key
        self.issuer = issuer
        self.service = service
        self.ttl = ttl

    def issue(self, account: str, grants: list[Grant]) -> str:
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"iss": self.issuer, "sub": account, "aud": self.service, "iat": now,
                  "nbf": now, "exp": now + int(self.ttl), "jti": secrets.token_hex(12),
                  "access": [{"type": g.kind, "name": g.name, "actions": list(g.actions)}
                             for g in grants]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = hmac.new(self._key, signing.encode(), hashlib.sha256).digest()
        return f"{signing}.{_b64(sig)}"

    def verify(self, token: str) -> dict | None:
        """The claims of a valid, current token for this service; else None."""
        try:
            head, body, sig = token.split(".")
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                return None
            if json.loads(_unb64(head)).get("alg") != "HS256":
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, binascii.Error, UnicodeDecodeError, AttributeError):
            return None
        now = time.time()
        if not isinstance(claims, dict) or claims.get("iss") != self.issuer \
                or claims.get("aud") != self.service:
            return None
        try:
            if not (float(claims["nbf"]) - LEEWAY <= now < float(claims["exp"]) + LEEWAY):
                return None
        except (KeyError, TypeError, ValueError):
            return None
        return claims


# -- ACL ------------------------------------------------------------------------------------


class Acl:
    """Account and name are fnmatch globs, as docker_auth users write them: ``""``
    matches anonymous requests only, ``*`` matches everyone (anonymous too), ``?*``
    any logged-in user."""

    def __init__(self, rules: tuple[AclRule, ...] | None, anonymous_pull: bool) -> None:
        if rules is None:     # the default: users do everything, anonymous as configured
            rules = (AclRule("", "*", frozenset({"pull"} if anonymous_pull else ())),
                     AclRule("?*", "*", frozenset({"*"})))
        self.rules = rules

    def allowed(self, account: str, name: str) -> frozenset[str]:
        """Actions ``account`` ("" = anonymous) may take on ``name`` (canonical)."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(account, rule.account) and fnmatch.fnmatchcase(name, rule.name):
                return frozenset({"pull", "push", "delete"}) if "*" in rule.actions \
                    else rule.actions
        return frozenset()

    def anonymous_can_pull(self) -> bool:
        """Whether some rule lets anonymous requests pull something."""
        return any(fnmatch.fnmatchcase("", r.account) and ({"pull", "*"} & r.actions)
                   for r in self.rules)


# -- the guard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    account: str                       # "" for anonymous
    token: dict | None = None          # claims, when a Bearer token was presented


class Guard:
    def __init__(self, config: AuthConfig, router: Router, data_dir: Path,
                 public_url: str | None = None) -> None:
        self.config = config
        self.router = router
        self.public_url = public_url
        self.users = Htpasswd(config.htpasswd)
        self.throttle = Throttle(config.max_failures, config.failure_window)
        self.tokens = Tokens(load_key(data_dir / "token.key"), config.issuer, config.service,
                             config.token_ttl) if config.token else None
        self.acl = Acl(config.acl, config.anonymous)

    def close(self) -> None:
        self.users.close()

    def canonical(self, name: str, ns: str | None = None) -> str:
        """``<upstream>/<repository>`` as the ACL sees ``name``. A name that routes
        nowhere (``?ns=`` naming no configured upstream) gets the name it would have
        there, so it is refused or allowed like any other: a client the ACL refuses
        cannot tell which upstreams exist."""
        try:
            route = self.router.resolve(name, ns)
        except NameUnknown:
            return f"{ns}/{name}"
        except RegistryError:
            return name        # an invalid name: answered as such once the ACL allows it
        return f"{route.upstream}/{route.repository}"

    # -- requests to the registry API

    async def identify(self, authorization: str | None, realm: str,
                       client: str | None = None) -> Identity:
        """Who sent the request (``client``: its address). Bad credentials are refused
        here; none, or Basic with an empty user and password (what containers/image
        clients send without a login), is anonymous."""
        if not authorization:
            return Identity("")
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.tokens is None:
            user, password = self._basic(value)
            if not user and not password:
                return Identity("")
            if not await self._password_ok(user, password, client):
                raise self._challenge(realm, "invalid username or password")
            return Identity(user)
        if scheme == "bearer" and self.tokens is not None:
            claims = self.tokens.verify(value.strip())
            if claims is None:
                raise self._challenge(realm, "invalid or expired token", error="invalid_token")
            return Identity(str(claims.get("sub", "")), claims)
        raise self._challenge(realm, "unsupported authorization scheme")

    async def _password_ok(self, user: str, password: str, client: str | None) -> bool:
        keys = (f"user:{user}",) + ((f"addr:{client}",) if client else ())
        self.throttle.begin(keys)
        ok = False
        try:
            ok = await self.users.check(user, password)
        finally:
            self.throttle.end(keys, ok)
        if not ok:
            log.info("failed login for %r from %s", user[:64], client or "?")
        return ok

    def check(self, identity: Identity, name: str | None, realm: str, ns: str | None = None,
              action: str = "pull") -> None:
        """Raise unless ``identity`` may ``action`` on repository ``name``. None is the
        ``/v2/`` login probe: it passes a logged-in user or a token holder only, so
        clients learn the challenge and send their credentials (a wrong password then
        fails to log in); anonymous clients go on anonymously or with an anonymous
        token, and keep exactly the rights the ACL gives anonymous requests."""
        if name is None:
            if identity.account or identity.token is not None:
                return
            raise self._challenge(realm, "authentication required")
        if identity.token is not None:
            granted = _granted(identity.token, "repository", name)
            # The token names the repository as the client wrote it; the ACL is asked
            # again for where this request really goes (?ns= can route the same name
            # to another upstream than the one the token was issued for).
            if granted is not None and action in granted and \
                    action in self.acl.allowed(identity.account, self.canonical(name, ns)):
                return
            scope = f"repository:{name}:{action}"
            if granted is not None and identity.account:
                raise Denied(f"{identity.account} may not {action} {name}")
            raise self._challenge(realm, "insufficient scope", scope=scope, error="insufficient_scope")
        if action in self.acl.allowed(identity.account, self.canonical(name, ns)):
            return
        if identity.account:
            raise Denied(f"{identity.account} may not {action} {name}")
        raise self._challenge(realm, "authentication required", scope=f"repository:{name}:{action}")

    def check_catalog(self, identity: Identity, realm: str) -> None:
        if identity.token is not None:
            if "*" not in (_granted(identity.token, "registry", "catalog") or ()):
                raise self._challenge(realm, "insufficient scope", scope="registry:catalog:*",
                                      error="insufficient_scope")
        elif not identity.account and not self.acl.anonymous_can_pull():
            raise self._challenge(realm, "authentication required")

    def may_list(self, identity: Identity, upstream: str, repository: str) -> bool:
        """Catalog entries shown to ``identity``: only what it may pull."""
        return "pull" in self.acl.allowed(identity.account, f"{upstream}/{repository}")

    # -- the token endpoint

    async def token_for(self, authorization: str | None, service: str | None,
                        scopes: list[str], client: str | None = None) -> tuple[str, int]:
        if self.tokens is None:
            raise NotFound("token auth is not enabled on this mirror")
        if service is not None and service != self.tokens.service:
            raise Unauthorized(f"unknown service {service[:100]!r}")
        account = ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise self._login_needed("the token endpoint takes Basic credentials")
            user, password = self._basic(value)
            if user or password:
                if not await self._password_ok(user, password, client):
                    raise self._login_needed("invalid username or password")
                account = user
        grants = [g for g in (self._grant(account, s) for s in scopes[:16]) if g is not None]
        return self.tokens.issue(account, grants), int(self.tokens.ttl)

    def _grant(self, account: str, scope: str) -> Grant | None:
        parts = scope.split(":")
        if len(parts) < 3:
            return None
        kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
        if kind == "registry" and name == "catalog":
            ok = account != "" or self.acl.anonymous_can_pull()
            return Grant("registry", "catalog", ("*",) if ok else ())
        if kind != "repository":
            return None
        try:
            validate_name(name)
            allowed = self.acl.allowed(account, self.canonical(name))
        except RegistryError:
            return None
        return Grant("repository", name, tuple(a for a in actions if a in allowed))

    # -- helpers

    def _login_needed(self, message: str) -> Unauthorized:
        return Unauthorized(message, headers={"WWW-Authenticate":
                                              f'Basic realm="{self.config.service}"'})

    def _basic(self, value: str) -> tuple[str, str]:
        try:
            raw = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        user, _, password = raw.partition(":")
        return user, password

    def _challenge(self, realm: str, message: str, scope: str | None = None,
                   error: str | None = None) -> Unauthorized:
        if self.tokens is None:
            header = f'Basic realm="{self.config.service}"'
        else:
            header = f'Bearer realm="{self.config.realm or realm}",service="{self.tokens.service}"'
            if scope:
                header += f',scope="{scope}"'
            if error:
                header += f',error="{error}"'
        return Unauthorized(message, headers={"WWW-Authenticate": header})


def _granted(claims: dict, kind: str, name: str) -> frozenset[str] | None:
    """Actions a token grants on (kind, name); None when it says nothing of it."""
    found = None
    for entry in claims.get("access") or []:
        if isinstance(entry, dict) and entry.get("type") == kind and entry.get("name") == name:
            actions = entry.get("actions") or []
            found = (found or frozenset()) | frozenset(a for a in actions if isinstance(a, str))
    return found
