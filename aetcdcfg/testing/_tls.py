"""Throw-away certificates for TLS tests, made with trustme (the ``testing`` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = ["TLSFiles"]


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and an
    unrelated CA (``other_ca_file``) for tests that must fail verification.

    The client certificate's CN is :attr:`CLIENT_USER`: the etcd user it authenticates as on an etcd
    with ``--client-cert-auth`` and auth enabled (``EtcdServer(tls=..., client_cert_auth=True)``).
    """

    #: The client certificate's common name.
    CLIENT_USER: ClassVar[str] = "aetcdcfg-client"

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        """Issue a fresh CA and certificates and write them into ``directory`` (created if missing)."""
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("TLSFiles needs trustme: pip install 'aetcdcfg[testing]'") from exc
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert(cls.CLIENT_USER, common_name=cls.CLIENT_USER)
        files = cls(
            ca_file=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server-key.pem",
            client_cert=directory / "client.pem",
            client_key=directory / "client-key.pem",
            other_ca_file=directory / "other-ca.pem",
        )
        ca.cert_pem.write_to_path(str(files.ca_file))
        # The chain (leaf first), so a verifier given only the root CA can always build the path.
        server_chain = b"".join(pem.bytes() for pem in server.cert_chain_pems)
        files.server_cert.write_bytes(server_chain)
        server.private_key_pem.write_to_path(str(files.server_key))
        client_chain = b"".join(pem.bytes() for pem in client.cert_chain_pems)
        files.client_cert.write_bytes(client_chain)
        client.private_key_pem.write_to_path(str(files.client_key))
        trustme.CA().cert_pem.write_to_path(str(files.other_ca_file))
        return files
