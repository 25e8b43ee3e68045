"""A Docker token-auth server (``GET /token``) for distribution's ``auth.token``.

Tokens are RS256 JWS signed with a fresh RSA key; its self-signed
certificate, ``cert_pem``, is the registry's ``rootcertbundle``
and carried in the JWT header as ``x5c``.  distribution 2.8 verifies the
chain against the bundle and also accepts a libtrust ``kid`` of a bundle
key, which we include as well.  ``aud`` must be a plain string in 2.8.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .server_thread import ServerThread

# grant(user_or_None, type, name, requested_actions) -> granted actions
GrantFn = Callable[[str | None, str, str, list[str]], list[str]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """libtrust fingerprint: sha256(SPKI DER)[:30], base32, ':' every 4 chars."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def parse_scope(scope: str) -> tuple[str, str, list[str]]:
    """``repository:org/app:pull,push`` -> (type, name, actions)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, [a for a in actions.split(",") if a]


@dataclass
class TokenRequest:
    """One request served by /token (as recorded in ``TokenServer.requests``)."""

    user: str | None
    service: str | None
    scopes: list[str]
    status: int
    granted: list[dict] = field(default_factory=list)


class TokenServer(ServerThread):
    """Token server on 127.0.0.1:<free port>, run by uvicorn in a thread.

    ``users`` are checked with HTTP Basic; bad credentials get 401.  Without
    credentials the request is 401 unless ``allow_anonymous``, in which case
    anonymous users are granted requested actions within
    ``anonymous_actions``.  Authenticated users get every requested action
    unless a ``grant`` callable decides otherwise.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        allow_anonymous: bool = False,
        anonymous_actions: tuple[str, ...] = ("pull",),
        expires_in: int = 300,
        issuer: str = "test-issuer",
        service: str = "test-registry",
        grant: GrantFn | None = None,
    ):
        self.users = dict(users if users is not None else {"alice": "secret"})
        self.allow_anonymous = allow_anonymous
        self.anonymous_actions = tuple(anonymous_actions)
        self.expires_in = expires_in
        self.issuer = issuer
        self.service = service
        self.grant = grant
        self.requests: list[TokenRequest] = []
        self.app = Starlette(routes=[Route("/token", self._token_endpoint)])
        super().__init__(self.app, name="token-server")
        self.realm = f"{self.url}/token"
        self._key, self._cert = _make_key_and_cert()
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    # -- tokens ------------------------------------------------------------
    def issue(self, subject: str, access: list[dict], *, audience: str | None = None,
              expires_in: int | None = None, issuer: str | None = None,
              not_before: int | None = None) -> str:
        """Sign a token directly (tests can forge odd audiences/expiries)."""
        now = int(time.time())
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": now + (self.expires_in if expires_in is None else expires_in),
            "nbf": now - 1 if not_before is None else not_before,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "kid": libtrust_key_id(self._key.public_key()),
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        signing_input = (b64url(json.dumps(header).encode()) + "."
                         + b64url(json.dumps(claims).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)

    def tokens_for(self, user: str | None = None) -> list[TokenRequest]:
        """Successful token requests (optionally only those by ``user``)."""
        return [r for r in self.requests if r.status == 200 and (user is None or r.user == user)]

    def _granted(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, name, wanted = parse_scope(scope)
            if self.grant is not None:
                actions = list(self.grant(user, kind, name, wanted))
            elif user is None:
                actions = [a for a in wanted if a in self.anonymous_actions]
            else:
                actions = wanted
            access.append({"type": kind, "name": name, "actions": actions})
        return access

    async def _token_endpoint(self, request: Request):
        service = request.query_params.get("service")
        scopes = [s for raw in request.query_params.getlist("scope") for s in raw.split()]
        user = None
        status = 200
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", None
            if self.users.get(user) != password:
                status = 401
        elif not self.allow_anonymous:
            status = 401
        if status != 200:
            self.requests.append(TokenRequest(user, service, scopes, status))
            return JSONResponse(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="test-token-server"'},
            )
        access = self._granted(user, scopes)
        token = self.issue(user or "", access, audience=service or self.service)
        self.requests.append(TokenRequest(user, service, scopes, 200, access))
        return JSONResponse({
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        })


def _make_key_and_cert():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-token-issuer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert
