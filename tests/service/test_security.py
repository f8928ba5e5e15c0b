"""Bearer tokens per service (constant-time, UNAUTHENTICATED / PERMISSION_DENIED) and TLS / mTLS with
certificates made in the test."""
from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client import Client, ClientConfig
from loraplex.server.config import ServiceConfig
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import ServerThread, engine_config_for_tests
from .reflection_client import ReflectionClient

ADMIN, ADMIN_OLD, GENERATION = "admin-token-1", "admin-token-0", "generation-token"


@pytest.fixture(scope="module")
def token_server(smol_fp32, tmp_path_factory):
    base = tmp_path_factory.mktemp("tokens")
    server = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"),
                                        admin_tokens=(ADMIN, ADMIN_OLD), generation_tokens=(GENERATION,)),
                          engine_config_for_tests(base / "cache"), smol_fp32)
    yield server
    server.stop()


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("token, admin, generation", [
    (None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    ("", grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED),
    (ADMIN + "x", grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED),
    (ADMIN, grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED),
    (ADMIN_OLD, grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED),
    (GENERATION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK),
])
def test_tokens_guard_each_service_separately(token_server, token, admin, generation):
    with Client(ClientConfig(target=token_server.target, token=token or None, timeout=30)) as client:
        if token == "":
            client.metadata = (("authorization", "Bearer "),)
        assert status_of(lambda: client.call(client.stubs.adapters.ListAdapters, apb.ListAdaptersRequest())) == admin
        upload = status_of(lambda: client.call(client.stubs.adapters.UploadAdapter, iter([apb.UploadAdapterRequest(
            name="x", file_name="adapter_config.json", data=b"{}")])))
        assert upload == (grpc.StatusCode.INVALID_ARGUMENT if admin == grpc.StatusCode.OK else admin)  # past auth
        assert status_of(lambda: client.call(client.stubs.generation.ModelInfo, gpb.ModelInfoRequest())) == generation
        stream = lambda: list(client.call(client.stubs.generation.GenerateStream, gpb.GenerateRequest(  # noqa: E731
            prompt="Hi", stopping=gpb.StoppingCriteria(max_new_tokens=1))))
        assert status_of(stream) == generation


def test_health_and_reflection_need_no_token(token_server):
    channel = grpc.insecure_channel(token_server.target)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert "loraplex.v1.Adapters" in ReflectionClient(channel).services()
    finally:
        channel.close()


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_key=None, issuer=None, ca=False, server=False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder, name, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 / localhost, a client certificate, and a stranger's."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("loraplex test CA", ca_key, ca=True)
    other_ca = _cert("another CA", other_key, ca=True)
    paths = {"ca": _write(folder, "ca", ca, ca_key)[0]}
    for name, issuer, issuer_key, server in (("server", ca, ca_key, True), ("client", ca, ca_key, False),
                                              ("stranger", other_ca, other_key, False)):
        key = _key()
        paths[name] = _write(folder, name, _cert(f"{name}.test", key, issuer_key, issuer, server=server), key)
    return paths


def _model_info(config: ClientConfig) -> grpc.StatusCode:
    with Client(config) as client:
        return status_of(lambda: client.call(client.stubs.generation.ModelInfo, gpb.ModelInfoRequest()))


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_tls_and_mtls(smol_fp32, tmp_path, pki, mtls):
    cert, key = pki["server"]
    server = ServerThread(ServiceConfig(port=0, http_port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                                        tls_cert=cert, tls_key=key, tls_ca=pki["ca"] if mtls else None),
                          engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    try:
        target = server.target
        plain = ClientConfig(target=target, timeout=5)
        verified = ClientConfig(target=target, tls_ca=pki["ca"], timeout=5)
        with_cert = ClientConfig(target=target, tls_ca=pki["ca"], tls_cert=pki["client"][0], tls_key=pki["client"][1],
                                 timeout=5)
        stranger = ClientConfig(target=target, tls_ca=pki["ca"], tls_cert=pki["stranger"][0],
                                tls_key=pki["stranger"][1], timeout=5)
        assert _model_info(plain) == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
        assert _model_info(with_cert) == grpc.StatusCode.OK
        if mtls:
            assert _model_info(verified) == grpc.StatusCode.UNAVAILABLE  # no client certificate
            assert _model_info(stranger) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
        else:
            assert _model_info(verified) == grpc.StatusCode.OK
        wrong_root = ClientConfig(target=target, tls_ca=pki["stranger"][0], timeout=5)
        assert _model_info(wrong_root) == grpc.StatusCode.UNAVAILABLE  # the server's certificate is not trusted
        with Client(with_cert) as client:
            assert client.model_info().base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        _check_https(server.server.http_port, pki, mtls)
    finally:
        server.stop()


def _check_https(port: int, pki, mtls: bool) -> None:
    """The HTTP API takes the same certificates: TLS only, and client certificates under mTLS."""
    models = f"https://127.0.0.1:{port}/v1/models"
    trusted = ssl.create_default_context(cafile=pki["ca"])  # the certificate names 127.0.0.1
    with_cert = ssl.create_default_context(cafile=pki["ca"])
    with_cert.load_cert_chain(*pki["client"])
    with urllib.request.urlopen(models, context=with_cert, timeout=10) as reply:
        assert json.loads(reply.read())["data"][0]["id"] == "base"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(models.replace("https", "http"), timeout=10).read()
    if mtls:
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(models, context=trusted, timeout=10).read()


def test_plaintext_health_port_beside_mtls(smol_fp32, tmp_path, pki, capsys):
    """Kubernetes' gRPC probes and `loraplex health` in a HEALTHCHECK speak plaintext: --health-port serves the
    health service alone there, while every other call still needs TLS and a client certificate."""
    from loraplex.server.cli import main

    cert, key = pki["server"]
    server = ServerThread(ServiceConfig(port=0, health_port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                                        tls_cert=cert, tls_key=key, tls_ca=pki["ca"]),
                          engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    health_target = f"127.0.0.1:{server.server.health_port}"
    try:
        assert server.server.health_port not in (None, 0, server.server.port)
        capsys.readouterr()
        assert main(["health", "--server", health_target]) == 0 and capsys.readouterr().out.strip() == "SERVING"
        assert main(["health", "--server", health_target, "--service", "loraplex.v1.Generation"]) == 0
        with Client(ClientConfig(target=health_target, timeout=5)) as client:  # nothing else on that port
            code = status_of(lambda: client.call(client.stubs.generation.ModelInfo, gpb.ModelInfoRequest()))
            assert code == grpc.StatusCode.UNIMPLEMENTED
        assert main(["health", "--server", server.target, "--timeout", "3"]) == 1  # the TLS port: no plaintext
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.stop()
    assert main(["health", "--server", health_target, "--timeout", "2"]) == 1  # gone with the server
