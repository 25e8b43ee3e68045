"""Who may pull what: htpasswd users, Basic or Bearer-token logins, and ACL rules.

- ``Htpasswd``: bcrypt entries as ``htpasswd -B`` writes them, re-read when the
  file changes; a verified password is remembered briefly, so Basic auth on every
  request does not pay bcrypt every time.
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

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from .config import AclRule, AuthConfig
from .errors import Denied, NotFound, RegistryError, Unauthorized
from .models import validate_name
from .routing import Router

log = logging.getLogger("mirror.auth")

VERIFIED_TTL = 300.0          # seconds a verified password is remembered
LEEWAY = 10.0                 # clock skew allowed on token times


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
        self._mtime: float | None = None
        self._verified: dict[tuple[str, bytes], float] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return
        if mtime != self._mtime:
            self._users = read_htpasswd(self.path)
            self._mtime = mtime
            self._verified.clear()

    def check(self, user: str, password: str) -> bool:
        self._load()
        hashed = self._users.get(user)
        if hashed is None or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        if self._verified.get(key, 0) > time.monotonic():
            return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:
            return False
        if ok:
            self._verified[key] = time.monotonic() + VERIFIED_TTL
        return ok


# -- tokens ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(path: Path) -> bytes:
    """The token signing key, made on first use (0600, in the data directory)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
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
    def __init__(self, config: AuthConfig, router: Router, data_dir: Path) -> None:
        self.config = config
        self.router = router
        self.users = Htpasswd(config.htpasswd)
        self.acl = Acl(config.acl, config.anonymous)
        self.tokens = Tokens(load_key(data_dir / "token.key"), config.issuer, config.service,
                             config.token_ttl) if config.token else None

    def canonical(self, name: str, ns: str | None = None) -> str:
        route = self.router.resolve(name, ns)
        return f"{route.upstream}/{route.repository}"

    # -- requests to the registry API

    def identify(self, authorization: str | None, realm: str) -> Identity:
        """Who sent the request. Bad credentials are refused here; none is anonymous."""
        if not authorization:
            return Identity("")
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.tokens is None:
            user, password = self._basic(value)
            if not self.users.check(user, password):
                raise self._challenge(realm, "invalid username or password")
            return Identity(user)
        if scheme == "bearer" and self.tokens is not None:
            claims = self.tokens.verify(value.strip())
            if claims is None:
                raise self._challenge(realm, "invalid or expired token", error="invalid_token")
            return Identity(str(claims.get("sub", "")), claims)
        raise self._challenge(realm, "unsupported authorization scheme")

    def check(self, identity: Identity, name: str | None, realm: str, ns: str | None = None,
              action: str = "pull") -> None:
        """Raise unless ``identity`` may ``action`` on repository ``name`` (None: the
        ``/v2/`` probe, which any accepted identity passes when login is optional)."""
        if name is None:
            if identity.account or identity.token is not None or self.acl.anonymous_can_pull():
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

    def token_for(self, authorization: str | None, service: str | None,
                  scopes: list[str]) -> tuple[str, int]:
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
            if not self.users.check(user, password):
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
