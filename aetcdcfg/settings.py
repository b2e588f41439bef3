"""EtcdSettings: how to reach etcd, from arguments or ``ETCD_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["EtcdSettings", "SettingsProblem"]

#: etcd rejects client pings closer than this (its default ``--grpc-keepalive-min-time``) with GOAWAY.
ETCD_DEFAULT_KEEPALIVE_MIN_TIME = 5.0


class SettingsProblem(ValueError):
    """What :class:`EtcdSettings`' own checks found. Its text never quotes a value (an endpoint URL
    may carry a password), so ``EtcdClient`` shows it as it is; pydantic's own messages it does not."""


class EtcdSettings(BaseSettings):
    """Connection settings for :class:`~aetcdcfg.EtcdClient`.

    Every field can come from the environment with the ``ETCD_`` prefix (``ETCD_ENDPOINTS`` is a
    comma-separated list). The password is a ``SecretStr``: it never shows in reprs or logs.
    """

    # hide_input_in_errors: a ValidationError's text would quote the value (a URL with a password)
    model_config = SettingsConfigDict(
        env_prefix="ETCD_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"],
        description="Member URLs, http:// or https://; tried in order, failing over to the next.",
    )
    username: str | None = Field(default=None, description="etcd user; enables authentication.")
    password: SecretStr | None = Field(default=None, description="Password of `username`.")
    ca_file: Path | None = Field(default=None, description="PEM CA bundle to verify members (https).")
    cert_file: Path | None = Field(default=None, description="PEM client certificate for mTLS.")
    key_file: Path | None = Field(default=None, description="PEM private key of `cert_file`.")
    server_name: str | None = Field(
        default=None, description="TLS name to verify instead of the endpoint's host."
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to find a reachable member.")
    request_timeout: float = Field(
        default=10.0, gt=0, description="Seconds for one request, retries and failover included."
    )
    keepalive_time: float = Field(
        default=10.0,
        gt=0,
        description="Seconds of silence before a connection or watch is probed. Keep it at or above "
        "etcd's --grpc-keepalive-min-time (5 s by default) or etcd answers with GOAWAY.",
    )
    keepalive_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a probe may go unanswered before the connection is dropped."
    )
    discover_endpoints: bool = Field(
        default=False,
        description="Also use every member the cluster lists (re-read each discovery_interval), so "
        "a client configured with one member follows the cluster.",
    )
    discovery_interval: float = Field(default=60.0, gt=0, description="Seconds between member list reads.")
    permission_check_interval: float = Field(
        default=60.0,
        ge=0,
        description="With credentials (a username, or a client certificate, whose CN etcd with "
        "--client-cert-auth takes as the user), seconds between a watch's checks that its user may "
        "still read the prefix (etcd checks permission only when a watch is created, so a revoked one "
        "would go unnoticed until the next reconnect); 0 turns the check off.",
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=4 * 1024 * 1024, description="Largest gRPC message accepted."
    )

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        if not value:
            raise SettingsProblem("at least one endpoint is needed, e.g. http://127.0.0.1:2379")
        cleaned = []
        for n, url in enumerate(value, 1):
            # named by position: the URL itself may hold a password (user:password@host)
            usage = f"endpoint {n} is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:2379"
            try:
                parts = urlsplit(url)
            except ValueError:  # e.g. an unclosed IPv6 bracket
                raise SettingsProblem(usage) from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsProblem(usage)
            try:
                port = parts.port
            except ValueError:
                raise SettingsProblem(f"endpoint {n} has an invalid port") from None
            if parts.username is not None or parts.password is not None:
                # gRPC ignores them, so they were dropped silently and authentication failed later
                raise SettingsProblem(
                    f"endpoint {n} holds a user name or password: give them as username and password"
                    " (ETCD_USERNAME, ETCD_PASSWORD), not in the URL"
                )
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise SettingsProblem(f"endpoint {n} must be scheme://host:port with no path")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            cleaned.append(f"{parts.scheme}://{host}:{port or 2379}")
        schemes = {url.split("://", 1)[0] for url in cleaned}
        if len(schemes) > 1:
            raise SettingsProblem("endpoints mix http:// and https://; use one scheme for the whole cluster")
        return cleaned

    @model_validator(mode="after")
    def _check_pairs(self) -> EtcdSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingsProblem("cert_file and key_file go together: set both for mTLS, or neither")
        if self.password is not None and self.username is None:
            raise SettingsProblem("password is set but username is not")
        if self.username is not None and self.password is None:
            raise SettingsProblem("username is set but password is not")
        if not self.tls and (self.ca_file or self.cert_file):
            raise SettingsProblem("ca_file/cert_file are set but the endpoints are http://; use https://")
        return self

    @property
    def credentials(self) -> bool:
        """A user is given (``username``) or may be taken from the client certificate: etcd with
        ``--client-cert-auth`` and auth enabled takes its CN as the user when no token is sent."""
        return self.username is not None or self.cert_file is not None

    @property
    def tls(self) -> bool:
        """True when the endpoints are https://."""
        return self.endpoints[0].startswith("https://")

    @property
    def targets(self) -> list[str]:
        """``host:port`` gRPC targets of the endpoints, in order."""
        return [url.split("://", 1)[1] for url in self.endpoints]
