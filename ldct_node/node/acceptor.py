"""The receiver's association acceptor: one TCP connection, from its A-ASSOCIATE-RQ to its end, in
the connection's own thread on a blocking socket.

pynetdicom's acceptor runs two threads per association that poll with 1 ms sleeps and hand every
PDU between them; with it the node received about 0.2x what DCMTK's storescp does. Here each PDU is
read whole (under the limits below) and each C-STORE answered before the next PDU is read. The
A-ASSOCIATE-RQ is decoded, the presentation contexts negotiated (SCP/SCU role selection included)
and the A-ASSOCIATE-AC or -RJ encoded by pynetdicom's own PDU classes and negotiation function
(``Negotiator``, which remembers its answers for the next association that proposes the same); the
policy (who may associate, what a stored instance becomes) is the caller's ``Policy``.

Protocol rules kept here (PS3.8 9, PS3.7 9.1):

- The A-ASSOCIATE-RQ must be complete within ``acse_timeout_s`` of connecting, however slowly it
  trickles; it and any PDU but P-DATA-TF may not exceed ASSOCIATE_RQ_MAX, a P-DATA-TF not the
  ``max_pdu`` we offered, and one DIMSE message not ``max_instance`` bytes: each is refused after the
  6-byte header (or the fragment) that shows it, with an A-ABORT, before more is read.
- A connection silent for ``network_timeout_s`` (between PDUs or inside one) is dropped.
- PDVs of a context that was not accepted, broken PDV items and PDUs out of place are answered with
  an A-ABORT (source service-provider). A command with a UID over 64 characters is aborted too
  (as pynetdicom does); a command other than C-STORE or C-ECHO is answered 0x0211 (unrecognised
  operation).
- With no presentation context acceptable the A-ASSOCIATE-AC says so for each and the association
  is then aborted, as pynetdicom did.
"""

from __future__ import annotations

import functools
import socket
import ssl
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, NamedTuple, Protocol

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.utils import decode_bytes, set_ae

from ldct_node.node.upper_layer import (
    ABORT,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    ASSOCIATE_AC,
    ASSOCIATE_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    ERROR_COMMENT,
    LAST,
    MESSAGE_ID,
    NO_DATA_SET,
    P_DATA_TF,
    PDU_HEADER,
    RELEASE_RP_PDU,
    RELEASE_RQ,
    RESPONDED_TO,
    STATUS,
    PeerClosed,
    PeerGone,
    TimedOut,
    abort_pdu,
    command_elements,
    command_set,
    element,
    p_data_tf,
    pdv_items,
    read_exactly,
    read_header,
    text_of,
    us,
    us_of,
    user_information,
)

# Largest A-ASSOCIATE-RQ (or release / abort PDU) read: 128 presentation contexts, each with ten
# 64-character transfer syntaxes, plus user identity, stay under 128 KiB.
ASSOCIATE_RQ_MAX = 256 * 1024
# A-ASSOCIATE-RQ/AC body (PS3.8 9.3.2, 9.3.3): protocol version, reserved, called and calling AE
# titles, 32 reserved bytes; the variable items follow.
_FIXED = 68
_PROTOCOL_VERSION = b"\x00\x01"
# Distinct sets of proposed items answered from memory: a site has a handful of senders. Bounded,
# so that callers proposing ever new items hold at most 64 requests of ASSOCIATE_RQ_MAX (16 MiB).
NEGOTIATIONS_REMEMBERED = 64
UID_MAX = 64
ERROR_COMMENT_MAX = 64  # ErrorComment is LO
UNRECOGNISED_OPERATION = 0x0211
# A-ABORT from the service-provider (PS3.8 9.3.8): unexpected PDU, invalid PDU parameter value.
_PROVIDER, _UNEXPECTED_PDU, _INVALID_PARAMETER = 0x02, 0x02, 0x06


class Refusal(NamedTuple):
    """Why the node refuses or cuts a connection: the metric's label and a one-line reason."""

    label: str
    reason: str


@dataclass(frozen=True)
class Limits:
    max_pdu: int  # the largest P-DATA-TF we offer and accept
    max_instance: int  # the largest DIMSE message (command or data set)
    acse_timeout_s: float
    network_timeout_s: float


@dataclass(frozen=True)
class Stored:
    """A C-STORE request with its data set as it arrived."""

    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data_set: bytes


class Policy(Protocol):
    """What the receiver decides; the acceptor does the protocol."""

    def requested(self, calling_ae: str, called_ae: str) -> tuple[int, int, int] | None:
        """None to go on negotiating, or the A-ASSOCIATE-RJ (result, source, reason) to answer."""

    def no_context(self) -> None:
        """Every presentation context was refused: the association is aborted after the AC."""

    def refused(self, refusal: Refusal, **fields) -> None:
        """A connection cut for a limit or a protocol fault (logged and counted by the receiver)."""

    def store(self, request: Stored) -> tuple[int, str | None]:
        """The C-STORE status and ErrorComment (None: none) for an instance."""


def overlong_uid(found: dict[int, bytes]) -> tuple[str, int] | None:
    """(keyword, length) of the first UID of a command set longer than DICOM's 64 characters."""
    for number, keyword in ((AFFECTED_SOP_CLASS, "AffectedSOPClassUID"),
                            (AFFECTED_SOP_INSTANCE, "AffectedSOPInstanceUID")):
        length = len(text_of(found.get(number, b"")))
        if length > UID_MAX:
            return keyword, length
    return None


def response(field: int, message_id: int, status: int, sop_class: bytes | None = None,
             sop_instance: bytes | None = None, comment: str | None = None) -> bytes:
    """A C-xxx-RSP command set (PS3.7 9.3.1.2, 9.3.5.2) answering message_id with status."""
    parts = []
    if sop_class is not None:
        parts.append(element(AFFECTED_SOP_CLASS, sop_class))
    parts += [element(COMMAND_FIELD, us(field | 0x8000)), element(RESPONDED_TO, us(message_id)),
              element(DATA_SET_TYPE, us(NO_DATA_SET)), element(STATUS, us(status))]
    if comment:
        text = comment[:ERROR_COMMENT_MAX].encode("ascii", "replace")
        parts.append(element(ERROR_COMMENT, text + b" " if len(text) % 2 else text))
    if sop_instance is not None:
        parts.append(element(AFFECTED_SOP_INSTANCE, sop_instance))
    return command_set(*parts)


def supported_contexts(supported: dict[str, tuple[str, ...]]) -> list[PresentationContext]:
    contexts = []
    for abstract, syntaxes in supported.items():
        context = PresentationContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list(syntaxes)
        contexts.append(context)
    return contexts


def ae_titles(body: bytes) -> tuple[str, str]:
    """(called, calling) AE title of an A-ASSOCIATE-RQ body, checked as pynetdicom checks them
    (ValueError: all spaces, or characters an AE title may not hold)."""
    if len(body) < _FIXED:
        raise ValueError("A-ASSOCIATE-RQ shorter than its fixed fields")
    titles = []
    for name, raw in (("Called AE Title", body[4:20]), ("Calling AE Title", body[20:36])):
        value = decode_bytes(raw).strip()
        if not value:
            raise ValueError(f"{name} consists of spaces")
        titles.append(set_ae(value, name, False, False))
    return titles[0], titles[1]


@dataclass(frozen=True)
class Negotiated:
    """What the node answers to one set of proposed presentation contexts and user information."""

    contexts: Mapping[int, str]  # accepted context ID -> transfer syntax; shared by every association that proposed the same
    items: bytes  # the A-ASSOCIATE-AC's variable items

    def accept_pdu(self, fixed: bytes) -> bytes:
        """The A-ASSOCIATE-AC; its AE title and reserved fields are the request's, as PS3.8 9.3.3 asks."""
        body = _PROTOCOL_VERSION + fixed[2:_FIXED] + self.items
        return PDU_HEADER.pack(ASSOCIATE_AC, len(body)) + body


class Negotiator:
    """Negotiates the variable items of an A-ASSOCIATE-RQ (application context, presentation
    contexts, user information with role selection) with pynetdicom, and remembers the answer: a
    sender proposes the same items for every association, and decoding and answering the 128
    contexts DCMTK's storescu proposes took pynetdicom 18 ms, as long as storing 5 instances."""

    def __init__(self, supported: dict[str, tuple[str, ...]], max_pdu: int):
        self.supported = supported
        self.max_pdu = max_pdu
        self.negotiate = functools.lru_cache(maxsize=NEGOTIATIONS_REMEMBERED)(self._negotiate)

    def _negotiate(self, items: bytes) -> Negotiated:
        """Raises (many types, pynetdicom's) for items that do not decode."""
        # Stand-in AE titles: the request's own are checked by ae_titles and echoed by accept_pdu.
        fixed = _PROTOCOL_VERSION + bytes(2) + b"ANY".ljust(16) * 2 + bytes(32)
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(PDU_HEADER.pack(ASSOCIATE_RQ, len(fixed) + len(items)) + fixed + items)
        request = pdu.to_primitive()
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, reply_roles = negotiate_as_acceptor(request.presentation_context_definition_list,
                                                     supported_contexts(self.supported), roles)
        answer = A_ASSOCIATE()
        answer.application_context_name = request.application_context_name
        answer.calling_ae_title = answer.called_ae_title = "ANY"
        answer.result = 0x00
        answer.presentation_context_definition_results_list = results
        answer.user_information = [*user_information(self.max_pdu), *reply_roles]
        accept = A_ASSOCIATE_AC()
        accept.from_primitive(answer)
        accepted = {cx.context_id: str(cx.transfer_syntax[0]) for cx in results if cx.result == 0x00}
        return Negotiated(MappingProxyType(accepted), accept.encode()[PDU_HEADER.size + _FIXED:])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    answer = A_ASSOCIATE()
    answer.result, answer.result_source, answer.diagnostic = result, source, reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(answer)
    return pdu.encode()


class Acceptor:
    """One connection's association. serve() returns how it ended: "released", "aborted" or None
    (the connection closed or went silent); it never raises for what the peer does."""

    def __init__(self, sock: socket.socket, limits: Limits, negotiator: Negotiator, policy: Policy):
        self.sock = sock
        self.limits = limits
        self.negotiator = negotiator
        self.policy = policy
        self.requested = False  # an A-ASSOCIATE-RQ arrived
        self.calling_ae = ""
        self._contexts: Mapping[int, str] = {}  # accepted context ID -> transfer syntax
        self._ended: str | None = None  # how negotiation ended when it did not lead to an association

    def serve(self) -> str | None:
        try:
            if not self._associate():
                return self._ended
            self.sock.settimeout(self.limits.network_timeout_s)
            return self._exchange()
        except (PeerGone, OSError, ssl.SSLError):
            return None

    def _abort(self, source: int = 0, reason: int = 0) -> None:
        try:
            self.sock.sendall(abort_pdu(source, reason))
        except (OSError, ssl.SSLError):
            pass  # the peer may be gone already; the connection ends either way

    def _too_long(self, pdu_type: int, length: int, limit: int) -> None:
        self._abort(_PROVIDER, _INVALID_PARAMETER)
        self.policy.refused(Refusal("pdu_too_long", f"PDU type 0x{pdu_type:02X} says {length} bytes, over the "
                                                    f"{limit} accepted"))

    def _associate(self) -> bool:
        """Negotiate; True once an A-ASSOCIATE-AC with an accepted context went out."""
        deadline = time.monotonic() + self.limits.acse_timeout_s
        try:
            pdu_type, length = read_header(self.sock, deadline)
        except PeerClosed:
            return False  # a port probe: no association was asked for
        except TimedOut:
            self._timed_out()
            return False
        if pdu_type != ASSOCIATE_RQ:
            self._abort(_PROVIDER, _UNEXPECTED_PDU)
            return False
        if length > ASSOCIATE_RQ_MAX:
            self._too_long(pdu_type, length, ASSOCIATE_RQ_MAX)
            return False
        try:
            body = read_exactly(self.sock, length, deadline)
        except PeerClosed:
            return False
        except TimedOut:
            self._timed_out()
            return False
        body = bytes(body)
        try:
            called_ae, calling_ae = ae_titles(body)
            negotiated = self.negotiator.negotiate(body[_FIXED:])
        except Exception:  # noqa: BLE001 - pynetdicom raises many types for a malformed PDU
            self._abort(_PROVIDER, _INVALID_PARAMETER)
            return False
        self.requested = True
        self.calling_ae = calling_ae
        rejection = self.policy.requested(calling_ae, called_ae)
        if rejection is not None:
            self.sock.sendall(reject_pdu(*rejection))
            return False
        self._contexts = negotiated.contexts
        self.sock.sendall(negotiated.accept_pdu(body[:_FIXED]))
        if not self._contexts:
            self.policy.no_context()
            self._abort()
            self._ended = "aborted"
            return False
        return True

    def _timed_out(self) -> None:
        self.policy.refused(Refusal("negotiation_timeout", "no A-ASSOCIATE-RQ within receive.acse_timeout_s "
                                                           f"({self.limits.acse_timeout_s} s)"))

    def _exchange(self) -> str | None:
        # The data set's fragments stay views into the PDUs they came in and are joined once, when
        # complete: the copies of half a megabyte per instance were about a tenth of the receiver's CPU.
        command, data, data_bytes, context_id = bytearray(), [], 0, None
        header: dict[int, bytes] | None = None  # the command set of the message whose data set is arriving
        while True:
            try:
                pdu_type, length = read_header(self.sock)
            except PeerGone:
                return None
            if pdu_type == P_DATA_TF:
                limit = self.limits.max_pdu
            else:
                limit = ASSOCIATE_RQ_MAX
            if length > limit:
                self._too_long(pdu_type, length, limit)
                return "aborted"
            body = read_exactly(self.sock, length)
            if pdu_type == RELEASE_RQ:
                self.sock.sendall(RELEASE_RP_PDU)
                return "released"
            if pdu_type == ABORT:
                return "aborted"
            if pdu_type != P_DATA_TF:
                self._abort(_PROVIDER, _UNEXPECTED_PDU)
                return "aborted"
            try:
                items = pdv_items(body)
            except ValueError:
                self._abort(_PROVIDER, _INVALID_PARAMETER)
                return "aborted"
            for item_context, control, value in items:
                if item_context not in self._contexts or (context_id is not None and item_context != context_id):
                    self._abort(_PROVIDER, _INVALID_PARAMETER)
                    return "aborted"
                context_id = item_context
                if control & COMMAND:
                    command += value
                else:
                    data.append(value)
                    data_bytes += len(value)
                if max(len(command), data_bytes) > self.limits.max_instance:
                    self._abort(_PROVIDER, _INVALID_PARAMETER)
                    self.policy.refused(Refusal("instance_too_large", "DIMSE message over receive.max_instance_bytes "
                                                                      f"({self.limits.max_instance})"))
                    return "aborted"
                if not control & LAST:
                    continue
                if control & COMMAND:
                    header = command_elements(bytes(command))
                    command.clear()
                    found = overlong_uid(header)
                    if found is not None:
                        self._abort(_PROVIDER, _INVALID_PARAMETER)
                        self.policy.refused(Refusal("uid_too_long", f"UID over {UID_MAX} characters: the association"
                                                                    " is aborted"), element=found[0], length=found[1])
                        return "aborted"
                    if us_of(header, DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET:
                        continue  # its data set follows
                    data, data_bytes = [], 0
                if header is None:
                    self._abort(_PROVIDER, _UNEXPECTED_PDU)  # a data set before its command
                    return "aborted"
                # The fragments go before the data set is handled: with them the PDUs they are views
                # into would stay alive as a second copy of the instance while it is parsed and stored.
                data_set, data, data_bytes = b"".join(data), [], 0
                self._answer(context_id, header, data_set)
                header, context_id, data_set = None, None, b""

    def _answer(self, context_id: int, header: dict[int, bytes], data_set: bytes) -> None:
        field, message_id = us_of(header, COMMAND_FIELD), us_of(header, MESSAGE_ID)
        sop_class, sop_instance = header.get(AFFECTED_SOP_CLASS), header.get(AFFECTED_SOP_INSTANCE)
        if field == C_ECHO_RQ:
            answer = response(field, message_id, 0x0000, sop_class)
        elif field == C_STORE_RQ and sop_class is not None and sop_instance is not None:
            status, comment = self.policy.store(Stored(self.calling_ae, text_of(sop_class), text_of(sop_instance),
                                                       self._contexts[context_id], data_set))
            answer = response(field, message_id, status, sop_class, sop_instance, comment)
        else:
            answer = response(field, message_id, UNRECOGNISED_OPERATION, sop_class, sop_instance)
        self.sock.sendall(p_data_tf(context_id, COMMAND | LAST, answer))
