"""All settings of ldct-node in one typed place, with their defaults.

A TOML file maps one table per dataclass below (``[receive]``, ``[derive]`` ...). Every key is
optional; unknown keys and values of the wrong type are rejected at start with a one-line
error that names the key, because a silently ignored typo in a hospital's routing
configuration is worse than a refusal to start.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from ldct_node.errors import UserError

APP_NAME = "ldct-node"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# At half the spacing a slice 1.5 steps away would match two neighbour offsets at once.
MAX_NEIGHBOUR_TOLERANCE = 0.5
# Largest receive.max_pdu: each association may hold about three PDUs of it while one is decoded.
MAX_RECEIVE_PDU = 64 * 1_048_576


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message fit to print as one line."""


def _need(ok: bool, key: str, what: str) -> None:
    """Each settings class's ``check(key)`` states its rules with this; key is the setting's dotted name."""
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


def _need_ae_title(ae_title: str, key: str) -> None:
    # PS3.5 AE: at most 16 characters, and leading/trailing spaces are not significant.
    _need(0 < len(ae_title.strip()) <= 16, key, "must be 1-16 characters")


def _need_port(port: int, key: str) -> None:
    _need(0 < port < 65536, key, "must be 1-65535")


def _need_choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    _need(value in allowed, key, f"must be one of {', '.join(allowed)}, got {value!r}")


def default_data_dir() -> Path:
    """Per-user data directory; systemd's StateDirectory overrides it via $STATE_DIRECTORY."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


@dataclass(frozen=True)
class ModelSettings:
    # None means the weights shipped with the package (see ldct_node.net.weights.default_weights_path).
    weights: Path | None = None


@dataclass(frozen=True)
class InferenceSettings:
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    batch_size: int = 8
    # Slices read and denoised at a time; bounds memory for total-body series of thousands of slices.
    chunk_slices: int = 64
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default (all cores)
    mixed_precision: bool = True  # only takes effect on CUDA
    # Vendors fill outside the reconstruction circle with -2000 or -3024 HU without always
    # declaring PixelPaddingValue; anything at or below this is treated as outside the field of view.
    outside_fov_below_hu: float = -1500.0
    # Models with in_slices > 1 see the slices before and after as extra channels; one enters only
    # when its distance along the slice normal is the stack's spacing (median step) within this
    # fraction of it, else the middle slice stands in, as at the volume's ends. A gap, a duplicate
    # or a subset re-send is at least 100 % off; positions written to 0.1 mm on 0.625 mm slices
    # are up to 16 % off and must still count as adjacent; below 0.5 no slice can match two offsets.
    neighbour_tolerance: float = 0.25

    def check(self, key: str) -> None:
        _need(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _need(self.chunk_slices >= 1, f"{key}.chunk_slices", "must be at least 1")
        _need(self.threads >= 0, f"{key}.threads", "must be 0 (default) or more")
        _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, f"{key}.device", "must be auto, cpu, cuda or cuda:N")
        _need(0 <= self.neighbour_tolerance < MAX_NEIGHBOUR_TOLERANCE, f"{key}.neighbour_tolerance",
              f"must be >= 0 and < {MAX_NEIGHBOUR_TOLERANCE} (a fraction of the slice spacing)")


@dataclass(frozen=True)
class FidelitySettings:
    """The per-series HU fidelity gate: a denoiser may remove noise but must not shift tissue HU.

    Measured in soft tissue of the source (see ldct_node.dicom.fidelity); a series whose change exceeds
    a limit fails with the reason instead of being sent. 0 disables a limit (still measured).
    """

    # |mean(out - in)| over soft tissue. Removing noise is zero-mean: a perfect denoiser (the
    # normal-dose image) reads under 0.1 HU on the shared series at 5-25 % simulated dose, while a
    # bias of a few HU already moves density readings; 3 HU separates the two.
    max_mean_hu_change: float = 3.0
    # 95th percentile of |Gaussian low-pass(out - in)| in soft tissue: shading (a regional shift)
    # that a zero overall mean hides. The removed noise has low-frequency streaks too: a perfect
    # denoiser reads 11.0 HU at 5 % dose (the shipped weights' target), 6.1 at 10 %, 2.9 at 25 %
    # on the shared series. 15 HU passes it at 5 % and fails shading beyond that; sites at 25 % dose
    # or more can lower it to about 8. A failure costs little: the original stays in PACS.
    max_lowpass_change_hu: float = 15.0
    # Soft tissue: fat to contrast-enhanced parenchyma, excluding air, lung and bone where edges
    # dominate. The bounds sit where few pixels are (below fat's -120..-80, above enhanced organs):
    # a bound on a tissue's own HU selects its pixels by their noise and fakes a change.
    soft_tissue_min_hu: float = -150.0
    soft_tissue_max_hu: float = 200.0
    # Width (Gaussian sigma) of the shading low-pass; larger than the noise grain, smaller than organs.
    lowpass_sigma_mm: float = 6.0

    def check(self, key: str) -> None:
        _need(self.max_mean_hu_change >= 0, f"{key}.max_mean_hu_change", "must be >= 0 (0 disables the limit)")
        _need(self.max_lowpass_change_hu >= 0, f"{key}.max_lowpass_change_hu", "must be >= 0 (0 disables the limit)")
        _need(self.soft_tissue_min_hu < self.soft_tissue_max_hu, f"{key}.soft_tissue_min_hu", f"must be below {key}.soft_tissue_max_hu")
        _need(self.lowpass_sigma_mm > 0, f"{key}.lowpass_sigma_mm", "must be > 0")


@dataclass(frozen=True)
class DeriveSettings:
    # "2.25." makes UUID-derived UIDs that need no registered root; sites may set their own.
    uid_root: str = "2.25."
    series_number_offset: int = 1000
    series_description_suffix: str = " [ldct-node denoised]"
    transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN
    institution_name: str = ""  # for ContributingEquipmentSequence; empty leaves it out

    def check(self, key: str) -> None:
        # UID components are digits without leading zeros (PS3.5 9.1); derived UIDs append to the root.
        _need(re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.", self.uid_root) is not None and len(self.uid_root) <= 32,
              f"{key}.uid_root", "must be a numeric UID prefix ending in '.', without leading zeros, at most 32 characters")
        # Both end up in LO elements: at most 64 characters and no backslash (the value separator).
        _need(len(self.series_description_suffix) < 64 and "\\" not in self.series_description_suffix,
              f"{key}.series_description_suffix", "must be shorter than 64 characters and contain no backslash")
        _need(len(self.institution_name) <= 64 and "\\" not in self.institution_name,
              f"{key}.institution_name", "must be at most 64 characters and contain no backslash")
        _need(self.transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN), f"{key}.transfer_syntax",
              "must be explicit (1.2.840.10008.1.2.1) or implicit (1.2.840.10008.1.2) VR little endian")


@dataclass(frozen=True)
class AllowedPeer:
    ae_title: str
    host: str = ""  # the IP address the caller connects from; empty: any address

    def check(self, key: str) -> None:
        _need_ae_title(self.ae_title, f"{key}.ae_title")


@dataclass(frozen=True)
class ReceiveTls:
    """DICOM TLS on the receiving port (PS3.15 B.9 secure transport): every connection must complete a
    TLS handshake (1.2 or later) within receive.acse_timeout_s, before any DICOM is read."""

    certificate: Path  # PEM: the node's certificate, followed by any intermediate certificates
    private_key: Path  # PEM, unencrypted (the service starts unattended); readable by the service user only
    # PEM bundle of the CAs that issue the senders' certificates. Set: a sender without a certificate
    # signed by one of them is refused during the handshake. Unset: any sender may connect (AE checks still apply).
    ca_file: Path | None = None


@dataclass(frozen=True)
class DestinationTls:
    """DICOM TLS towards one destination. The peer's certificate is always verified."""

    # PEM bundle of the CAs to trust for the destination's certificate; unset: the system's trust store.
    ca_file: Path | None = None
    # The certificate must name the destination's host (DNS name or IP address, as in `host`).
    check_hostname: bool = True
    # The node's own certificate and key (PEM), for a destination that requires client certificates.
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class AssociationSettings:
    """What every association the node takes part in is held to, whether it accepts it (receive) or
    asks for it (send, echo): the receiver's acceptor, the sender's requestor and
    ``ldct_node.node.association.configure_ae`` (echo) apply it."""

    ae_title: str
    max_pdu: int
    # Requestor: TCP connect, TLS handshake and A-ASSOCIATE answer; acceptor: a complete A-ASSOCIATE-RQ.
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float


def association_of(section) -> AssociationSettings:
    """The association settings of [receive] or [send], which name them alike."""
    return AssociationSettings(section.ae_title, section.max_pdu, section.acse_timeout_s, section.dimse_timeout_s,
                               section.network_timeout_s)


@dataclass(frozen=True)
class ReceiveSettings:
    ae_title: str = "LDCT_NODE"
    host: str = "127.0.0.1"
    port: int = 11112
    # Associations at once of callers that passed the called-AE and allow-list checks; connections
    # still negotiating are counted apart (max_pending_*), so they cannot lock allowed callers out.
    max_associations: int = 32
    # Per calling AE title and address: one caller cannot take every slot. 16 lets one PACS or
    # scanner send 16 series in parallel.
    max_associations_per_caller: int = 16
    # TCP connections that have not (yet) been let in, in all and per address; each lasts at most
    # acse_timeout_s. Beyond them a new connection is closed at once, before any thread is started.
    max_pending_connections: int = 64
    max_pending_per_address: int = 16
    # Largest P-DATA PDU a caller may send (we offer it at association); a longer one is aborted
    # after its 6-byte header. pynetdicom's 16 kB default halves throughput for 512² CT.
    max_pdu: int = 1_048_576
    # Largest instance (DIMSE data set) one C-STORE may carry, held in memory while it arrives
    # (about 3x that per association while it is parsed); a 512² CT slice is 0.5 MiB.
    max_instance_bytes: int = 64 * 1_048_576
    # Deadline from TCP connect to a complete A-ASSOCIATE-RQ (the ARTIM timer), however it trickles in.
    acse_timeout_s: float = 10.0
    dimse_timeout_s: float = 60.0
    # Idle timeout of an association: a caller silent this long, between PDUs or inside one, is dropped.
    network_timeout_s: float = 120.0
    tcp_nodelay: bool = True
    # Empty list: any caller is accepted (the embedded default only listens on loopback).
    allowed: tuple[AllowedPeer, ...] = ()
    # Below this free space on the spool volume C-STORE answers "out of resources".
    min_free_bytes: int = 512 * 1024 * 1024
    # [receive.tls]: accept DICOM TLS only on this port; unset: plain TCP.
    tls: ReceiveTls | None = None

    def check(self, key: str) -> None:
        _need_ae_title(self.ae_title, f"{key}.ae_title")
        _need_port(self.port, f"{key}.port")
        for name in ("max_associations", "max_associations_per_caller", "max_pending_connections", "max_pending_per_address"):
            _need(getattr(self, name) >= 1, f"{key}.{name}", "must be at least 1")
        # 0 (unlimited) would let any caller make the node buffer a PDU of up to 4 GiB.
        _need(4096 <= self.max_pdu <= MAX_RECEIVE_PDU, f"{key}.max_pdu", f"must be 4096 to {MAX_RECEIVE_PDU} bytes")
        _need(self.max_instance_bytes >= self.max_pdu, f"{key}.max_instance_bytes", f"must be at least {key}.max_pdu")
        for name in ("acse_timeout_s", "network_timeout_s"):
            _need(getattr(self, name) > 0, f"{key}.{name}", "must be > 0 seconds")
        _need(self.min_free_bytes >= 0, f"{key}.min_free_bytes", "must be >= 0")
        for i, peer in enumerate(self.allowed):
            peer.check(f"{key}.allowed[{i}]")

    association = property(association_of)


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: DestinationTls | None = None  # e.g. tls = { ca_file = "/etc/ldct-node/pacs-ca.pem" }; unset: plain TCP

    def check(self, key: str) -> None:
        _need(bool(self.name.strip()), f"{key}.name", "must not be empty")
        _need_ae_title(self.ae_title, f"{key}.ae_title")
        _need(bool(self.host.strip()), f"{key}.host", "must not be empty")
        _need_port(self.port, f"{key}.port")


@dataclass(frozen=True)
class SendSettings:
    ae_title: str = "LDCT_NODE"  # calling AE title used towards destinations
    destinations: tuple[Destination, ...] = ()
    max_pdu: int = 1_048_576
    # A failed delivery is tried again after backoff_initial_s, doubling up to backoff_max_s, and
    # failed only once it has been pending for give_up_after_s: a PACS down for a night or a
    # weekend's maintenance window is caught up by itself. attempts > 0 also caps the tries.
    attempts: int = 0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    give_up_after_s: float = 86400.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0

    def check(self, key: str) -> None:
        _need_ae_title(self.ae_title, f"{key}.ae_title")
        for i, dest in enumerate(self.destinations):
            dest.check(f"{key}.destinations[{i}]")
        # Delivery state, TLS contexts and `echo` pick a destination by name: two of one name would be one.
        _need(len({d.name for d in self.destinations}) == len(self.destinations), f"{key}.destinations", "must have unique names")
        _need(self.max_pdu >= 4096 or self.max_pdu == 0, f"{key}.max_pdu", "must be 0 (unlimited) or >= 4096")
        _need(self.attempts >= 0, f"{key}.attempts", f"must be 0 (no limit, only {key}.give_up_after_s) or more")
        _need(self.backoff_initial_s > 0, f"{key}.backoff_initial_s", "must be > 0")
        _need(self.backoff_max_s >= self.backoff_initial_s, f"{key}.backoff_max_s", f"must be >= {key}.backoff_initial_s")
        _need(self.give_up_after_s > 0, f"{key}.give_up_after_s", "must be > 0")

    association = property(association_of)


@dataclass(frozen=True)
class QueueSettings:
    # A series is complete once no instance of it arrived for this long.
    quiet_period_s: float = 10.0
    poll_interval_s: float = 0.5
    # On SIGTERM, how long to wait for a series being denoised or sent; an interrupted one is
    # simply redone after the restart, so this only trades shutdown time for wasted work.
    stop_timeout_s: float = 10.0
    # Denoise and send a series while it arrives (ldct_node.node.stream); the quiet period then only
    # closes it. Off by default: slices reach PACS before the HU fidelity gate has seen the whole
    # series (it is applied to the slices so far after every chunk). Needs a single-slice model and
    # the embedded worker (no [broker]); otherwise series wait for the quiet period.
    stream: bool = False

    def check(self, key: str) -> None:
        _need(self.quiet_period_s >= 0, f"{key}.quiet_period_s", "must be >= 0")
        _need(self.poll_interval_s > 0, f"{key}.poll_interval_s", "must be > 0")
        _need(self.stop_timeout_s >= 0, f"{key}.stop_timeout_s", "must be >= 0")


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path = field(default_factory=default_data_dir)
    # Spooled input and derived output are removed after delivery unless kept this many days.
    keep_days: float = 0.0
    # While the outbox volume is full the worker waits this long between tries; the series stays queued.
    disk_full_retry_s: float = 60.0

    def check(self, key: str) -> None:
        _need(self.keep_days >= 0, f"{key}.keep_days", "must be >= 0")
        _need(self.disk_full_retry_s > 0, f"{key}.disk_full_retry_s", "must be > 0")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def database(self) -> Path:
        return self.data_dir / "queue.sqlite3"


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080

    def check(self, key: str) -> None:
        _need_port(self.port, f"{key}.port")


@dataclass(frozen=True)
class BrokerSettings:
    """Scale-out (``ldct_node.node.broker``): worker hosts take series from Redis Streams."""

    # redis://[:password@]host:6379/0 (rediss:// for TLS); empty: no broker, the node denoises itself.
    url: str = ""
    # Streams are <stream>:jobs and <stream>:results: several nodes can share one Redis with different prefixes.
    stream: str = "ldct"
    # A series a worker took and has not confirmed for this long goes to another worker (the first one died).
    visibility_timeout_s: float = 300.0
    # How often a worker confirms the series it holds; 0: a fifth of visibility_timeout_s.
    heartbeat_s: float = 0.0
    # Shown in `queue list` and /metrics; empty: <hostname>-<pid>.
    worker_name: str = ""

    def check(self, key: str) -> None:
        _need(not self.url or self.url.startswith(("redis://", "rediss://", "unix://")), f"{key}.url",
              "must be empty (no broker) or a redis://, rediss:// or unix:// URL")
        _need(re.fullmatch(r"[A-Za-z0-9_.:-]+", self.stream) is not None, f"{key}.stream",
              "must be letters, digits and _ . : - only")
        _need(self.visibility_timeout_s > 0, f"{key}.visibility_timeout_s", "must be > 0 seconds")
        _need(0 <= self.heartbeat_s < self.visibility_timeout_s, f"{key}.heartbeat_s",
              f"must be 0 (a fifth of {key}.visibility_timeout_s) or more, and below {key}.visibility_timeout_s")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s or self.visibility_timeout_s / 5


@dataclass(frozen=True)
class LogSettings:
    LEVELS: typing.ClassVar[tuple[str, ...]] = ("debug", "info", "warning", "error")
    FORMATS: typing.ClassVar[tuple[str, ...]] = ("auto", "json", "console")

    level: str = "info"
    format: str = "auto"  # "auto": JSON when stderr is not a terminal, "json", "console"

    def check(self, key: str) -> None:
        _need_choice(self.level, self.LEVELS, f"{key}.level")
        _need_choice(self.format, self.FORMATS, f"{key}.format")


@dataclass(frozen=True)
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    derive: DeriveSettings = field(default_factory=DeriveSettings)
    receive: ReceiveSettings = field(default_factory=ReceiveSettings)
    send: SendSettings = field(default_factory=SendSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)


def _convert(value: object, hint: object, key: str) -> object:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table")
        return _build(hint, value, key)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key '{key}' must be a non-empty path string")
        return Path(value).expanduser()
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise ConfigError(f"config key '{key}' must be of type {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type")  # pragma: no cover


def _build(cls: type, table: dict, prefix: str) -> object:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {known})")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config table '{prefix}' is incomplete: {exc}") from None


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first setting that cannot work.

    Each section states its own rules in its ``check(key)``, next to its fields; a section without
    one (``[model]``) has none beyond the types ``_build`` enforces.
    """
    for section in dataclasses.fields(cfg):
        check = getattr(getattr(cfg, section.name), "check", None)
        if check is not None:
            check(section.name)


def _readable(path: Path | None, key: str, what: str) -> None:
    """A one-line ConfigError when a file the node needs at start cannot be read."""
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"config key '{key}': {what} {path} not found: check the path"
                          f" (an absolute path; relative ones are taken from the working directory)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"config key '{key}': {what} {path} cannot be read: make it readable by the user"
                          " the node runs as (for a private key: owned by that user, mode 0600)")


def validate_tls(cfg: Config) -> None:
    """The TLS files named in cfg exist and can be read (their contents are checked by ldct_node.node.tls)."""
    tls = cfg.receive.tls
    if tls is not None:
        _readable(tls.certificate, "receive.tls.certificate", "certificate file")
        _readable(tls.private_key, "receive.tls.private_key", "private key file")
        _readable(tls.ca_file, "receive.tls.ca_file", "CA file")
    for i, dest in enumerate(cfg.send.destinations):
        if dest.tls is None:
            continue
        key = f"send.destinations[{i}].tls"
        if (dest.tls.certificate is None) != (dest.tls.private_key is None):
            raise ConfigError(f"config key '{key}' needs both certificate and private_key (a client certificate), or neither")
        _readable(dest.tls.ca_file, f"{key}.ca_file", "CA file")
        _readable(dest.tls.certificate, f"{key}.certificate", "certificate file")
        _readable(dest.tls.private_key, f"{key}.private_key", "private key file")


def read_toml(path: Path, what: str, error: type[UserError], not_found: str, unreadable: str = "check its permissions") -> dict:
    """The table in a TOML file; a missing, unreadable or malformed file is one ``error`` line that
    names ``what`` the file is, its path, and what to do (``not_found``, ``unreadable``)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{what} {path} not found: {not_found}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML ({exc}): fix the syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} cannot be read ({exc}): {unreadable}") from None


def load_config(path: Path | None = None) -> Config:
    """The configuration from a TOML file, or the embedded default when path is None."""
    if path is None:
        cfg = Config()
    else:
        table = read_toml(path, "config file", ConfigError, not_found="check the path (serve, denoise, queue and echo also run without --config, on the embedded default)",
                          unreadable="check its permissions (run as the service user)")
        cfg = _build(Config, table, "")
    validate(cfg)
    validate_tls(cfg)
    return cfg
