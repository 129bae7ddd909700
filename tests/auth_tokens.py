"""A local OIDC issuer for tests: RSA keys made here, a JWKS served over real HTTP on
loopback, and tokens shaped like Auth0 access tokens.

    with LocalIssuer() as issuer:
        settings = issuer.settings(tmp_path)            # auth on, issuer and audience set
        token = issuer.token(roles=["project:demo:operator"])
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from schemas.settings import Settings

AUDIENCE = "lockn-tune-api"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class LocalIssuer:
    """An issuer at http://127.0.0.1:<port>/ with its JWKS at /.well-known/jwks.json.

    `fetches` counts JWKS requests, to check the verifier's caching and rate limits.
    """

    def __init__(self, audience: str = AUDIENCE):
        self.audience = audience
        self.keys: dict[str, rsa.RSAPrivateKey] = {}  # kid -> key, as published in the JWKS
        self.current_kid = self._add_key()
        self.fetches = 0
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                body = json.dumps(issuer.jwks()).encode()
                with issuer._lock:
                    issuer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        # Port 0: the OS picks a free port, with no window for another process to take it.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}/"
        self.jwks_url = f"{self.issuer}.well-known/jwks.json"
        # A short poll interval so stop() returns at once rather than after serve_forever's 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="local-issuer", daemon=True
        )
        self._thread.start()

    def _add_key(self) -> str:
        kid = uuid.uuid4().hex[:12]
        self.keys[kid] = new_key()
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in list(self.keys.items()):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def rotate(self, keep_old: bool = True) -> str:
        """Publish a new current signing key; drop the others unless `keep_old`. Returns its kid."""
        kid = self._add_key()
        if not keep_old:
            self.keys = {kid: self.keys[kid]}
        self.current_kid = kid
        return kid

    def retire(self, kid: str) -> None:
        """Stop publishing key `kid` (without making a new one)."""
        del self.keys[kid]

    def token(
        self,
        sub: str | None = "alice",
        roles: list[str] | dict[str, Any] | str | None = None,
        claim: str = "permissions",
        audience: str | list[str] | None = None,
        issuer: str | None = None,
        expires_in: int | None = 3600,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        alg: str = "RS256",
        **extra_claims: Any,
    ) -> str:
        """An access token as Auth0 issues it; every argument can be bent to make a bad one.

        `sub=None` / `expires_in=None` leave the claim out; `kid` defaults to the current key's
        (an unknown kid is signed with the current key); alg "HS256" signs with the public
        key's PEM as HMAC secret and "none" leaves the token unsigned (algorithm confusion).
        """
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer if issuer is None else issuer,
            "aud": self.audience if audience is None else audience,
            "iat": now,
        }
        if sub is not None:
            claims["sub"] = sub
        if expires_in is not None:
            claims["exp"] = now + expires_in
        if roles is not None:
            claims[claim] = roles
        claims.update(extra_claims)
        kid = self.current_kid if kid is None else kid
        key = key or self.keys.get(kid) or self.keys[self.current_kid]
        if alg == "RS256":
            return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        if alg == "none":
            return jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
        if alg == "HS256":
            # By hand: PyJWT refuses a PEM key as an HMAC secret, which is exactly the attack.
            header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
            payload = _b64(json.dumps(claims).encode())
            signature = hmac.new(public_pem(key), f"{header}.{payload}".encode(), hashlib.sha256).digest()
            return f"{header}.{payload}.{_b64(signature)}"
        raise ValueError(f"LocalIssuer cannot sign with {alg!r}")

    def settings(self, home: Path, **overrides: Any) -> Settings:
        """Settings with auth on against this issuer; the JWKS address is left to its default."""
        fields = {"home": home, "auth_enabled": True, "oidc_issuer": self.issuer, "oidc_audience": self.audience}
        return Settings(**{**fields, **overrides})

    def stop(self) -> None:
        """Stop serving the JWKS; fetches then fail with connection refused. Safe to call twice."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
