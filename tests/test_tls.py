"""DICOM TLS: the receiver against DCMTK's TLS storescu, the sender against DCMTK's TLS storescp, and the
one-line errors for certificate files that cannot be used. Certificates are made here with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ldct_node.config import ConfigError, Destination, DestinationTls, ReceiveSettings, ReceiveTls, load_config
from ldct_node.node.receive import Receiver
from ldct_node.node.send import SendError, send_series
from ldct_node.node.tls import client_context, server_context
from tests.peers import STORESCP, STORESCU, PeerUnavailable, require, running_storescp, storescu
from tests.synthetic import ct_series, write_series
from tests.test_send import SETTINGS

OPENSSL = shutil.which("openssl")
TIMEOUT_S = 60


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=TIMEOUT_S)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(key, certificate) of a CA, a server and a client it signed, and a client of another CA."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    return {"ca": ca, "rogue_ca": rogue_ca, "server": _leaf(folder, "server", ca),
            "client": _leaf(folder, "client", ca), "rogue_client": _leaf(folder, "rogue-client", rogue_ca)}


@pytest.fixture
def dcmtk():
    try:
        require(STORESCU), require(STORESCP)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def series(tmp_path) -> list[Path]:
    return write_series(tmp_path / "in", ct_series(2, rows=16, columns=16), names=["a.dcm", "b.dcm"])


@pytest.fixture
def tls_receiver(receivers, pki):
    def start(require_client_cert: bool) -> Receiver:
        tls = ReceiveTls(certificate=pki["server"][1], private_key=pki["server"][0],
                         ca_file=pki["ca"][1] if require_client_cert else None)
        return receivers(tls=tls, acse_timeout_s=5.0)

    return start


def refused(receiver: Receiver) -> float:
    return receiver.metrics.registry.get_sample_value("ldct_connections_refused_total", {"reason": "tls_handshake"}) or 0


def spooled(receiver: Receiver) -> int:
    return len(list(receiver.spool.root.rglob("*.dcm")))


def tls_args(key_cert: tuple[Path, Path], ca: tuple[Path, Path]) -> list[str]:
    return ["+tls", str(key_cert[0]), str(key_cert[1]), "+cf", str(ca[1])]


# --- receive: DCMTK storescu over TLS to the node ------------------------------------------------


@pytest.mark.peers
def test_storescu_with_a_client_certificate_of_the_ca_stores_over_tls(tls_receiver, pki, dcmtk, series):
    receiver = tls_receiver(require_client_cert=True)
    done = storescu(series, receiver.port, "LDCT_NODE", extra_args=tls_args(pki["client"], pki["ca"]),
                    timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert spooled(receiver) == 2


@pytest.mark.peers
def test_client_certificate_of_another_ca_is_refused_in_the_handshake(tls_receiver, pki, dcmtk, series):
    receiver = tls_receiver(require_client_cert=True)
    done = storescu(series, receiver.port, "LDCT_NODE", extra_args=tls_args(pki["rogue_client"], pki["ca"]),
                    timeout_s=TIMEOUT_S)
    assert done.returncode != 0
    assert spooled(receiver) == 0 and refused(receiver) == 1


@pytest.mark.peers
def test_no_client_certificate_is_refused_when_the_ca_file_requires_one(tls_receiver, pki, dcmtk, series):
    receiver = tls_receiver(require_client_cert=True)
    done = storescu(series, receiver.port, "LDCT_NODE", extra_args=["+tla", "+cf", str(pki["ca"][1])],
                    timeout_s=TIMEOUT_S)
    assert done.returncode != 0
    assert spooled(receiver) == 0 and refused(receiver) == 1


@pytest.mark.peers
def test_without_ca_file_a_sender_needs_no_certificate_of_its_own(tls_receiver, pki, dcmtk, series):
    receiver = tls_receiver(require_client_cert=False)
    done = storescu(series, receiver.port, "LDCT_NODE", extra_args=["+tla", "+cf", str(pki["ca"][1])],
                    timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert spooled(receiver) == 2


@pytest.mark.peers
def test_plain_dicom_to_the_tls_port_is_refused_and_the_port_keeps_serving(tls_receiver, pki, dcmtk, series):
    receiver = tls_receiver(require_client_cert=True)
    plain = storescu(series, receiver.port, "LDCT_NODE", timeout_s=TIMEOUT_S)
    assert plain.returncode != 0 and spooled(receiver) == 0 and refused(receiver) == 1
    done = storescu(series, receiver.port, "LDCT_NODE", extra_args=tls_args(pki["client"], pki["ca"]),
                    timeout_s=TIMEOUT_S)
    assert done.returncode == 0 and spooled(receiver) == 2


@pytest.mark.peers
def test_a_silent_connection_does_not_hold_up_the_handshake_of_others(tls_receiver, pki, dcmtk, series):
    """pynetdicom shakes hands in its accept loop; the node does it in the connection's own thread."""
    import socket

    receiver = tls_receiver(require_client_cert=True)
    with socket.create_connection(("127.0.0.1", receiver.port)):  # connects, never sends a ClientHello
        done = storescu(series, receiver.port, "LDCT_NODE", extra_args=tls_args(pki["client"], pki["ca"]),
                        timeout_s=TIMEOUT_S)
        assert done.returncode == 0, done.stdout + done.stderr
    assert spooled(receiver) == 2


# --- send: the node over TLS to DCMTK storescp --------------------------------------------------


def _tls_destination(scp, **tls) -> Destination:
    return Destination("pacs", scp.aet, "127.0.0.1", scp.port, tls=DestinationTls(**tls))


@pytest.mark.peers
def test_sender_stores_to_a_tls_storescp_verifying_its_certificate(tmp_path, pki, dcmtk, series):
    server = pki["server"]
    with running_storescp(tmp_path / "pacs", extra_args=["+tls", str(server[0]), str(server[1]), "-ic"]) as scp:
        result = send_series(series, _tls_destination(scp, ca_file=pki["ca"][1]), SETTINGS)
        assert result.sent == 2 and len(scp.received()) == 2


@pytest.mark.peers
def test_sender_presents_its_client_certificate_to_a_storescp_that_requires_one(tmp_path, pki, dcmtk, series):
    server, client = pki["server"], pki["client"]
    with running_storescp(tmp_path / "pacs", extra_args=tls_args(server, pki["ca"])) as scp:  # -rc: required
        without = _tls_destination(scp, ca_file=pki["ca"][1])
        with pytest.raises(SendError, match="TLS"):
            send_series(series, without, SETTINGS)
        result = send_series(series, _tls_destination(scp, ca_file=pki["ca"][1], certificate=client[1],
                                                      private_key=client[0]), SETTINGS)
        assert result.sent == 2 and len(scp.received()) == 2


@pytest.mark.peers
def test_sender_refuses_a_storescp_whose_certificate_its_ca_did_not_sign(tmp_path, pki, dcmtk, series):
    server = pki["server"]
    with running_storescp(tmp_path / "pacs", extra_args=["+tls", str(server[0]), str(server[1]), "-ic"]) as scp:
        with pytest.raises(SendError, match="TLS"):
            send_series(series, _tls_destination(scp, ca_file=pki["rogue_ca"][1]), SETTINGS)
        assert scp.received() == []


# --- configuration: one-line errors -------------------------------------------------------------


def _config(tmp_path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_tls_tables_are_read_into_typed_settings(tmp_path, pki):
    cfg = load_config(_config(tmp_path, f"""
[receive.tls]
certificate = "{pki['server'][1]}"
private_key = "{pki['server'][0]}"
ca_file = "{pki['ca'][1]}"
[[send.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 2762
tls = {{ ca_file = "{pki['ca'][1]}", check_hostname = false }}
"""))
    assert cfg.receive.tls == ReceiveTls(pki["server"][1], pki["server"][0], pki["ca"][1])
    assert cfg.send.destinations[0].tls == DestinationTls(ca_file=pki["ca"][1], check_hostname=False)


@pytest.mark.parametrize(("table", "message"), [
    ('[receive.tls]\ncertificate = "{missing}"\nprivate_key = "{key}"',
     r"'receive.tls.certificate': certificate file .* not found: check the path"),
    ('[receive.tls]\ncertificate = "{cert}"',
     r"config table 'receive.tls' is incomplete"),
    ('[send]\ndestinations = [{{ name = "p", ae_title = "P", host = "h", port = 1, tls = {{ certificate = "{cert}" }} }}]',
     r"'send.destinations\[0\].tls' needs both certificate and private_key"),
    ('[send]\ndestinations = [{{ name = "p", ae_title = "P", host = "h", port = 1, tls = {{ ca_file = "{missing}" }} }}]',
     r"'send.destinations\[0\].tls.ca_file': CA file .* not found"),
])
def test_unusable_tls_settings_stop_the_start_with_one_line(tmp_path, pki, table, message):
    text = table.format(missing=tmp_path / "nope.pem", key=pki["server"][0], cert=pki["server"][1])
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(_config(tmp_path, text))
    assert "\n" not in str(caught.value)


def test_unreadable_private_key_says_to_make_it_readable(tmp_path, pki, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(pki["server"][0]) else real(p, mode))
    text = f'[receive.tls]\ncertificate = "{pki["server"][1]}"\nprivate_key = "{pki["server"][0]}"'
    with pytest.raises(ConfigError, match=r"cannot be read: make it readable by the user the node runs as"):
        load_config(_config(tmp_path, text))


def test_a_key_of_another_certificate_or_a_non_pem_file_is_a_one_line_config_error(tmp_path, pki):
    with pytest.raises(ConfigError, match="check that the key belongs to the certificate"):
        server_context(ReceiveTls(certificate=pki["server"][1], private_key=pki["client"][0]))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM CA certificate"):
        client_context(DestinationTls(ca_file=junk))
    # The receiver builds its context when it is made: the node stops at start, not at the first caller.
    with pytest.raises(ConfigError):
        Receiver(ReceiveSettings(tls=ReceiveTls(pki["server"][1], pki["client"][0])), None, None)
