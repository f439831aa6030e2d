"""Bearer tokens and TLS, as the bucket serves them (--*-tokens, --tls-*)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Bucket, packet, wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from prana_bucket import (
    AsyncIngestClient,
    AsyncSubscriber,
    Delivery,
    IngestClient,
    PermissionDeniedError,
    Retry,
    Subscriber,
    UnauthenticatedError,
    UnavailableError,
)

TOKENS = ["--ingest-tokens", "ingest-secret", "--consumer-tokens", "consumer-secret",
          "--admin-tokens", "admin-secret"]  # fmt: skip


def test_tokens(make_bucket: Callable[..., Bucket]) -> None:
    bucket = make_bucket(TOKENS, admin_token="admin-secret")
    with IngestClient(bucket.target) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.ingest(packet())
    with (
        IngestClient(bucket.target, token="consumer-secret") as wrong,
        pytest.raises(PermissionDeniedError),
    ):
        wrong.ingest(packet())
    with IngestClient(bucket.target, token="ingest-secret") as client:
        packet_id = client.ingest(packet()).packet_id

    # A consumer without a token stops with the error instead of retrying.
    with Subscriber(bucket.target) as subscriber:
        future = subscriber.subscribe(lambda d: None)
        with pytest.raises(UnauthenticatedError):
            future.result(timeout=30)

    seen: list[str] = []
    with Subscriber(bucket.target, token="consumer-secret") as subscriber:
        future = subscriber.subscribe(lambda d: seen.append(d.packet_id))
        wait_for(lambda: bucket.status().processed_packets == 1)
        future.cancel()
        future.result(timeout=30)
    assert seen == [packet_id]


def test_tokens_asyncio(make_bucket: Callable[..., Bucket]) -> None:
    bucket = make_bucket(TOKENS, admin_token="admin-secret")

    async def main() -> None:
        async with AsyncSubscriber(bucket.target, token="ingest-secret") as wrong:
            with pytest.raises(PermissionDeniedError):
                await asyncio.wait_for(wrong.subscribe(handle), 30)
        async with AsyncIngestClient(bucket.target, token="ingest-secret") as client:
            await client.ingest(packet())

    async def handle(delivery: Delivery) -> None:
        pass

    asyncio.run(main())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(make_bucket: Callable[..., Bucket], certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    pem = cert.read_bytes()
    bucket = make_bucket(["--tls-cert", str(cert), "--tls-key", str(key)], tls_cert=pem)
    with IngestClient(bucket.target, tls=True, root_certificates=pem) as client:
        packet_id = client.ingest(packet()).packet_id
    # https:// in the target turns TLS on too.
    seen: list[str] = []
    with Subscriber(f"https://{bucket.target}", root_certificates=pem) as subscriber:
        future = subscriber.subscribe(lambda d: seen.append(d.packet_id))
        wait_for(lambda: bucket.status().processed_packets == 1)
        future.cancel()
        future.result(timeout=30)
    assert seen == [packet_id]

    async def aio() -> None:
        async with AsyncIngestClient(bucket.target, tls=True, root_certificates=pem) as client:
            await client.ingest(packet("aio-tls"))

    asyncio.run(aio())

    once = Retry(attempts=1, timeout=3.0)
    # Plaintext on the TLS port, and TLS without the certificate's root, fail.
    with IngestClient(bucket.target, retry=once) as plain, pytest.raises(UnavailableError):
        plain.ingest(packet())
    with (
        IngestClient(bucket.target, tls=True, retry=once) as unknown,
        pytest.raises(UnavailableError),
    ):
        unknown.ingest(packet())
