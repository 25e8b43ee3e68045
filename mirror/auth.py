"""Who may pull what: logins (Basic, or Bearer tokens from /token) and ACL rules.

- ``Acl``: docker_auth style rules, first match wins; names are matched as
  ``<upstream>/<repository>`` so one repository has one name whatever route
  (``?ns=``, path prefix, default) a client used; a hosted repository is matched
  by its name as pushed (``myorg/app``), with no upstream in front.
- ``Guard``: what api.py calls: authenticate a request and check one action, or
  answer the token endpoint. Failing checks raise ``Unauthorized`` (with the
  challenge a client needs) or ``Denied``. Passwords are checked by ``passwords``
  (htpasswd, off the event loop, throttled), tokens by ``tokens``. The server's
  local token (``local_access``: ``Bearer`` + the secret in ``data_dir/local.token``)
  is the local identity, which every check passes (``mirror warm``).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from .config import AclRule, AuthConfig
from .errors import Denied, NameUnknown, NotFound, RegistryError, Unauthorized
from .models import validate_name
from .passwords import Htpasswd, Throttle
from .routing import HOSTED, Router
from .tokens import Grant, Tokens

log = logging.getLogger("mirror.auth")


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
    token: dict[str, Any] | None = None   # claims, when a Bearer token was presented
    local: bool = False                # the local token (local_access.py): passes every check


class Guard:
    def __init__(self, config: AuthConfig, router: Router, token_key: bytes | None,
                 public_url: str | None = None, local_token: str | None = None) -> None:
        """``token_key``: the bearer-token signing key (signing_keys.py decides where it
        lives); needed with ``auth.token``."""
        if config.token and token_key is None:
            raise ValueError("auth.token needs the token signing key")
        self.config = config
        self.local_token = local_token
        self.router = router
        self.public_url = public_url
        self.users = Htpasswd(config.htpasswd)
        self.throttle = Throttle(config.max_failures, config.failure_window)
        self.tokens = Tokens(token_key, config.issuer, config.service, config.token_ttl) \
            if config.token and token_key is not None else None
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
        return _acl_name(route.upstream, route.repository)

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
        if scheme == "bearer" and self.local_token and hmac.compare_digest(
                value.strip().encode(), self.local_token.encode()):
            return Identity("", local=True)
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
              action: str = "pull", pull_also: tuple[str, ...] = ()) -> None:
        """Raise unless ``identity`` may ``action`` on repository ``name``. None is the
        ``/v2/`` login probe: it passes a logged-in user or a token holder only, so
        clients learn the challenge and send their credentials (a wrong password then
        fails to log in); anonymous clients go on anonymously or with an anonymous
        token, and keep exactly the rights the ACL gives anonymous requests.
        ``pull_also`` (valid names: a mount's ``from``) joins a challenge's scope as
        ``repository:<name>:pull``, so the token asked for can read the source too."""
        if identity.local:
            return
        scope = " ".join([f"repository:{name}:{action}"] +
                         [f"repository:{other}:pull" for other in pull_also if other != name])
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
            if granted is not None and identity.account:
                raise Denied(f"{identity.account} may not {action} {name}")
            raise self._challenge(realm, "insufficient scope", scope=scope,
                                  error="insufficient_scope")
        if action in self.acl.allowed(identity.account, self.canonical(name, ns)):
            return
        if identity.account:
            raise Denied(f"{identity.account} may not {action} {name}")
        raise self._challenge(realm, "authentication required", scope=scope)

    def check_catalog(self, identity: Identity, realm: str) -> None:
        if identity.local:
            return
        if identity.token is not None:
            if "*" not in (_granted(identity.token, "registry", "catalog") or ()):
                raise self._challenge(realm, "insufficient scope", scope="registry:catalog:*",
                                      error="insufficient_scope")
        elif not identity.account and not self.acl.anonymous_can_pull():
            raise self._challenge(realm, "authentication required")

    def may_list(self, identity: Identity, upstream: str, repository: str) -> bool:
        """Catalog entries shown to ``identity``: only what it may pull."""
        return self.may(identity, "pull", upstream, repository)

    def may(self, identity: Identity, action: str, upstream: str, repository: str) -> bool:
        """Whether the ACL lets ``identity`` ``action`` (pull, push, delete) the
        repository (the web page's question: it has no token scopes)."""
        return identity.local or \
            action in self.acl.allowed(identity.account, _acl_name(upstream, repository))

    # -- the web page's logins

    async def login(self, user: str, password: str, client: str | None) -> bool:
        """A user name and password, checked as a Basic login is (htpasswd, off the
        event loop, throttled: TooManyRequests when too many failed)."""
        if not user:
            return False
        return await self._password_ok(user, password, client)

    def basic(self, authorization: str | None) -> tuple[str, str] | None:
        """(user, password) of a Basic ``Authorization`` header, or None."""
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            return self._basic(value)
        except Unauthorized:
            return None

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


def _acl_name(upstream: str, repository: str) -> str:
    return repository if upstream == HOSTED else f"{upstream}/{repository}"


def _granted(claims: dict[str, Any], kind: str, name: str) -> frozenset[str] | None:
    """Actions a token grants on (kind, name); None when it says nothing of it."""
    found = None
    for entry in claims.get("access") or []:
        if isinstance(entry, dict) and entry.get("type") == kind and entry.get("name") == name:
            actions = entry.get("actions") or []
            found = (found or frozenset()) | frozenset(a for a in actions if isinstance(a, str))
    return found
