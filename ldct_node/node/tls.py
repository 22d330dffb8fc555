"""DICOM TLS (PS3.15 Annex B.9, BCP 195): the ssl.SSLContext of the receiving port and of each destination.

Both sides speak TLS 1.2 or later with the ssl module's default (forward-secret, AEAD) cipher suites,
which DCMTK's default "BCP 195 non-downgrading" profile accepts. A certificate, key or CA file that
cannot be used stops the node at start with a one-line ConfigError naming the setting, never at the
first association.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ldct_node.config import ConfigError, DestinationTls, ReceiveTls


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"config key '{key}': {exc.filename} not found: check the path") from None
    except PermissionError as exc:
        raise ConfigError(f"config key '{key}': {exc.filename} cannot be read: make it readable by the user"
                          " the node runs as") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"config key '{key}': {certificate} and {private_key} are not a PEM certificate and its unencrypted"
            f" private key ({getattr(exc, 'reason', None) or exc}): check that the key belongs to the certificate"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"config key '{key}': CA file {ca_file} not found: check the path") from None
    except PermissionError:
        raise ConfigError(f"config key '{key}': CA file {ca_file} cannot be read: make it readable by the user"
                          " the node runs as") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"config key '{key}': {ca_file} holds no PEM CA certificate"
                          f" ({getattr(exc, 'reason', None) or exc}): give the CA's certificate in PEM form") from None


def server_context(settings: ReceiveTls) -> ssl.SSLContext:
    """For the receiving port: our certificate; with ca_file, a client certificate signed by it is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings.certificate, settings.private_key, "receive.tls")
    if settings.ca_file is not None:
        _load_ca(context, settings.ca_file, "receive.tls.ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: DestinationTls, key: str = "send.destinations[].tls") -> ssl.SSLContext:
    """Towards a destination: its certificate verified (against ca_file or the system's CAs), ours if set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.check_hostname
    if settings.ca_file is not None:
        _load_ca(context, settings.ca_file, f"{key}.ca_file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.certificate is not None and settings.private_key is not None:
        _load_chain(context, settings.certificate, settings.private_key, key)
    return context
