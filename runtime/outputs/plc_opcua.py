"""Verdicts for the line's PLC over OPC UA (`inspect-run … --opcua opc.tcp://HOST:PORT`): inspect-run is the
server (asyncua), as OPC 40100-1 (OPC UA for Machine Vision) has the vision system be. Under Objects/EdgeInspect:

- State ("Operational", "Alarm" while a health alarm is active, "Halted" when the run ends), ActiveAlarms (their
  messages), RunId, BundleVersion and BundleDigest (the model's SHA-256: which version judged);
- Sources/<name>: Frames and NgFrames since the start, and LastResult: ResultId, Verdict ("OK", "NG",
  "skipped"), ResultEvaluation (OPC 40001-101's: 1 OK, 2 NotOK, 0 Undefined), Score, Threshold, FrameIndex (the
  record's seq), Regions, BundleVersion, CreationTime: a PLC may poll these;
- events, from the EdgeInspect object: a ResultReadyEventType per frame carrying the same (subscribe with a queue
  to get every result in order), and a HealthAlarmEventType when an alarm is raised or cleared.

Security: on a loopback address without a user name, anonymous access with no encryption (a PLC runtime on the
same box, a test); otherwise a user name and password are required and the only endpoints are signed and
encrypted (Basic256Sha256 and the newer Aes128-Sha256-RsaOaep and Aes256-Sha256-RsaPss). The server's key and
certificate are made on first use in the PKI folder (owner-only); a client's certificate is taken only once it
is in PKI/trusted (an unknown one is refused and put in PKI/rejected, to be moved over by whoever trusts it).

The server runs in the PLC servers' process (plc_process), on its asyncio loop; a client that stops reading or
requesting costs bounded memory there (each subscription's queue is capped and a
subscription nobody asks to publish expires)."""

import asyncio
import hmac
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from edgeinspect.runtime.console import InspectError, RateLimitedWarning
from edgeinspect.runtime.files import atomic_write_bytes
from edgeinspect.runtime.outputs.view_access import is_loopback

NAMESPACE = "urn:edge-inspect:opcua"
DEFAULT_PORT = 4840
EVALUATION = {"OK": 1, "NG": 2}  # OPC 40001-101 ResultEvaluationEnum; anything else 0 (Undefined)
RESULT_STATE = {"completed": 1, "aborted": 3}  # OPC 40100-1 ResultStateDataType: a skipped frame was not judged
QUEUE_CAP = 2000  # events or changes queued per monitored item for a client that does not ask for them
MAX_SESSIONS = 32
MAX_SUBSCRIPTIONS = 64
HALTED_GRACE_S = 0.5  # "Halted" stays served this long before the server stops
REJECTED_KEPT = 100  # certificates kept in PKI/rejected (anyone on the network can offer one)
RESULT_FIELDS = (  # (name, variant type name): the event's properties and LastResult's variables alike
    ("ResultId", "String"), ("IsPartial", "Boolean"), ("ResultState", "Int32"), ("JobId", "String"),
    ("InternalRecipeId", "String"), ("InternalConfigurationId", "String"), ("CreationTime", "DateTime"),
    ("ResultEvaluation", "Int32"), ("Verdict", "String"), ("Score", "Double"), ("Threshold", "Double"),
    ("FrameIndex", "Int64"), ("Regions", "UInt32"), ("BundleVersion", "UInt32"))
ALARM_FIELDS = (("AlarmId", "String"), ("Kind", "String"), ("Active", "Boolean"))


def parse_opcua_endpoint(text: str) -> tuple[str, int]:
    """opc.tcp://HOST[:PORT][/PATH] → (host, port); the port is 4840 when none is given."""
    hint = f"--opcua {text!r}: give opc.tcp://HOST:PORT, e.g. opc.tcp://0.0.0.0:4840"
    try:
        parts = urlsplit(text)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InspectError(hint + " (port 1 to 65535)") from None
    if parts.scheme != "opc.tcp" or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise InspectError(hint)
    return parts.hostname, port


def check_opcua_options(endpoint: str, username: str | None, password: str | None) -> None:
    """With a user name the server is secured (user name and password, signed and encrypted endpoints only)."""
    host, _ = parse_opcua_endpoint(endpoint)
    if password and not username:
        raise InspectError("--opcua-password needs --opcua-username")
    if username and not password:
        raise InspectError("--opcua-username needs a password (--opcua-password, $EDGE_INSPECT_OPCUA_PASSWORD or "
                           "opcua.password in --config)")
    if not username and not is_loopback(host):
        raise InspectError(f"--opcua {endpoint}: beyond loopback, give --opcua-username and a password (anonymous "
                           "access is for loopback only)")


def check_pki_folder(folder: Path) -> None:
    """Owner-only folders, made if missing; a key readable by others is refused."""
    try:
        for path in (folder, folder / "own", folder / "trusted", folder / "rejected"):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as error:
        raise InspectError(f"--opcua-pki {folder}: cannot make it ({error.strerror or error})") from None
    key = folder / "own" / "key.pem"
    if key.exists() and key.stat().st_mode & 0o077:
        raise InspectError(f"--opcua-pki: {key} is readable by others (chmod 600 {key})")


class PasswordCheck:
    """asyncua's user manager: the client's secure channel is signed with a trusted certificate (asyncua checks
    only the certificate a client names in CreateSession, which it may leave out), and the one user name and
    password match, compared in constant time; a refusal is said (at most once a minute) without what was given."""

    def __init__(self, username: str, password: str, trust: "TrustList", warn: RateLimitedWarning):
        self._username, self._password, self.trust, self.warn = username.encode(), password.encode(), trust, warn

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole
        from cryptography import x509

        channel = x509.load_der_x509_certificate(certificate) if isinstance(certificate, bytes) else certificate
        if channel is None or not self.trust.is_trusted(channel):
            if channel is not None:
                self.trust.keep_rejected(channel, "a client")
            return None
        given_name = (username or "").encode()
        given_password = password if isinstance(password, bytes) else (password or "").encode()
        if hmac.compare_digest(given_name, self._username) & hmac.compare_digest(given_password, self._password):
            return User(role=UserRole.User, name=username)
        self.warn("opcua-password", "--opcua: refused a client: wrong user name or password")
        return None


class TrustList:
    """A client's certificate is valid, and in PKI/trusted (read again at each new session, so a certificate moved
    there is taken without a restart); one refused for not being trusted is kept in PKI/rejected (at most
    REJECTED_KEPT of them)."""

    def __init__(self, folder: Path, warn: RateLimitedWarning):
        from asyncua.crypto.truststore import TrustStore
        from asyncua.crypto.validator import (
            CertificateValidator,
            CertificateValidatorOptions,
        )

        self.folder, self.warn = folder, warn
        self.store = TrustStore([folder / "trusted"], [])
        self.loaded = False
        self.validator = CertificateValidator(CertificateValidatorOptions.TRUSTED_VALIDATION
                                              | CertificateValidatorOptions.PEER_CLIENT, self.store)

    async def load(self) -> bool:
        """Read PKI/trusted again; False when it holds no certificate (or a file that is not one: said)."""
        try:
            await self.store.load()
            self.loaded = True
        except ValueError as error:  # nothing trusted yet ("can't create an empty store"), or not a certificate
            self.loaded = False
            if any((self.folder / "trusted").iterdir()):
                self.warn("opcua-trusted", f"--opcua: {self.folder / 'trusted'} holds a file that is not a "
                          f"certificate ({error}); no client is let in until it is mended")
        return self.loaded

    def is_trusted(self, certificate) -> bool:
        return self.loaded and self.store.is_trusted(certificate)

    async def __call__(self, certificate, app_description) -> None:
        """asyncua's validator for the certificate a client names in CreateSession."""
        from asyncua import ua
        from asyncua.common.utils import ServiceError

        if not await self.load():
            self.keep_rejected(certificate, app_description.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        try:
            await self.validator(certificate, app_description)
        except ServiceError as error:
            if error.code == ua.StatusCodes.BadCertificateUntrusted:
                self.keep_rejected(certificate, app_description.ApplicationUri)
            else:
                self.warn("opcua-certificate", f"--opcua: refused the client {app_description.ApplicationUri}: "
                          f"its certificate is not valid for it ({ua.StatusCode(error.code).name})")
            raise

    def keep_rejected(self, certificate, client: str) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.serialization import Encoding

        name = certificate.fingerprint(hashes.SHA1()).hex()
        kept = self.folder / "rejected" / f"{name}.der"
        if not kept.exists() and sum(1 for _ in (self.folder / "rejected").iterdir()) >= REJECTED_KEPT:
            self.warn("opcua-untrusted", f"--opcua: refused {client}: its certificate is not trusted ({kept.parent} "
                                         f"is full: {REJECTED_KEPT} kept)")
            return
        atomic_write_bytes(kept, certificate.public_bytes(Encoding.DER))
        self.warn("opcua-untrusted", f"--opcua: refused {client}: its certificate is not trusted (kept as {kept}; "
                                     f"move it to {self.folder / 'trusted'} to let it in)")


async def own_certificate(folder: Path, application_uri: str) -> tuple[Path, Path]:
    """The server's key (made once, owner-only) and self-signed certificate (made again when missing, expired,
    or for another host name or application URI)."""
    from asyncua.crypto import cert_gen
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key, certificate = folder / "own" / "key.pem", folder / "own" / "certificate.der"
    if not key.exists():
        atomic_write_bytes(key, cert_gen.dump_private_key_as_pem(cert_gen.generate_private_key()))  # mode 0600
    await cert_gen.setup_self_signed_certificate(
        key, certificate, application_uri, socket.gethostname(),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": f"edge-inspect on {socket.gethostname()}", "organizationName": "edge-inspect"})
    return key, certificate


def record_time(record: dict) -> datetime:
    try:
        return datetime.fromisoformat(record["time"])
    except (KeyError, TypeError, ValueError):
        return datetime.now(timezone.utc)


class OpcUaServer:
    """One frame's result at a time (plc_process's), on the loop it was started on."""

    def __init__(self, endpoint: str, sources: list[str], run_id: str, bundle: dict, pki: Path,
                 username: str | None = None, password: str | None = None):
        """The options as inspect-run checked them (check_opcua_options, and the address free); `bundle`: the
        version judging, plc_process.bundle_identity's {"version", "digest"}."""
        self.secured = bool(username)
        self.endpoint, self.credentials = endpoint, (username, password)
        self.port = parse_opcua_endpoint(endpoint)[1]
        self.sources, self.run_id = list(sources), run_id
        self.version, self.digest = bundle["version"], bundle["digest"]
        self.digests = {self.version: self.digest}  # every version judged in this run → its model's digest
        self.counts = {label: [0, 0] for label in sources}  # frames, NG
        self.written: dict[str, dict] = {label: {} for label in sources}  # LastResult as last written
        self.active_alarms: dict[str, str] = {}
        self.warn = RateLimitedWarning()
        self.pki = Path(pki)

    async def start(self) -> None:
        from asyncua import Server, ua
        from asyncua.server.internal_session import InternalSession

        for name in ("asyncua", "asyncuagds"):  # their lines (tracebacks for refused clients) would flood the console
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if self.secured:
            check_pki_folder(self.pki)
        self.ua = ua
        application_uri = f"urn:edge-inspect:{socket.gethostname()}"
        trust = TrustList(self.pki, self.warn) if self.secured else None
        self.server = Server(user_manager=PasswordCheck(*self.credentials, trust, self.warn) if self.secured else None)
        await self.server.init()
        self.server.set_server_name("edge-inspect")
        parts = urlsplit(self.endpoint)
        self.server.set_endpoint(f"opc.tcp://{parts.netloc.rsplit(':', 1)[0] if parts.port else parts.netloc}:"
                                 f"{self.port}{parts.path}")
        await self.server.set_application_uri(application_uri)
        self.server.iserver.max_monitored_item_queue_size = QUEUE_CAP
        self.server.iserver.max_subscriptions = MAX_SUBSCRIPTIONS
        InternalSession.max_connections = MAX_SESSIONS
        policy = ua.SecurityPolicyType
        if self.secured:
            key, certificate = await own_certificate(self.pki, application_uri)
            await self.server.load_certificate(certificate)
            await self.server.load_private_key(key)
            self.server.set_security_policy([policy.Basic256Sha256_SignAndEncrypt,
                                             policy.Aes128Sha256RsaOaep_SignAndEncrypt,
                                             policy.Aes256Sha256RsaPss_SignAndEncrypt])
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
            await trust.load()
            self.server.set_certificate_validator(trust)
        else:
            self.server.set_security_policy([policy.NoSecurity])
            self.server.set_identity_tokens([ua.AnonymousIdentityToken])
        await self._build_address_space()
        await self.use_bundle({"version": self.version, "digest": self.digest})
        await self.server.start()

    async def _build_address_space(self) -> None:
        ua, server = self.ua, self.server
        idx = await server.register_namespace(NAMESPACE)
        kinds = {name: getattr(ua.VariantType, kind) for name, kind in RESULT_FIELDS + ALARM_FIELDS}
        kinds.update(Frames=ua.VariantType.UInt64, NgFrames=ua.VariantType.UInt64)
        result_type = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [(name, kinds[name]) for name, _ in RESULT_FIELDS])
        alarm_type = await server.create_custom_event_type(
            idx, "HealthAlarmEventType", ua.ObjectIds.BaseEventType,
            [(name, kinds[name]) for name, _ in ALARM_FIELDS])
        system = await server.nodes.objects.add_object(idx, "EdgeInspect")
        self.vars = {}
        for name, value, kind in (("State", "Operational", ua.VariantType.String),
                                  ("ActiveAlarms", [], ua.VariantType.String),
                                  ("RunId", self.run_id, ua.VariantType.String),
                                  ("BundleVersion", 0, ua.VariantType.UInt32),
                                  ("BundleDigest", "", ua.VariantType.String)):
            self.vars[name] = (await system.add_variable(idx, name, value, varianttype=kind)).nodeid
        folder = await system.add_folder(idx, "Sources")
        self.source_vars = {}
        for label in self.sources:
            node = await folder.add_object(idx, label)
            names = {name: (await node.add_variable(idx, name, 0, varianttype=ua.VariantType.UInt64)).nodeid
                     for name in ("Frames", "NgFrames")}
            last = await node.add_object(idx, "LastResult")
            for name, kind in RESULT_FIELDS:
                initial = ua.get_default_value(kinds[name])
                names[name] = (await last.add_variable(idx, name, initial, varianttype=kinds[name])).nodeid
            self.source_vars[label] = (node.nodeid, names)
        self.kinds = kinds
        self.results = await server.get_event_generator(result_type, system)
        self.alarms = await server.get_event_generator(alarm_type, system)

    @property
    def clients(self) -> int:
        """Clients connected, for the operator's page."""
        bserver = getattr(getattr(self, "server", None), "bserver", None)
        return len(bserver.clients) if bserver else 0

    async def _write(self, nodeid, value, kind, when: datetime | None = None) -> None:
        ua = self.ua
        await self.server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(value, kind), SourceTimestamp=when))

    async def publish(self, result: dict) -> None:
        """One frame: LastResult and the counters, then the ResultReady event."""
        label, verdict, seq = result["source"], result["verdict"], result["seq"]
        if label not in self.counts:
            return
        counts = self.counts[label]
        counts[0] += verdict != "skipped"
        counts[1] += verdict == "NG"
        when = record_time(result)
        fields = {"ResultId": f"{self.run_id}/{seq}", "IsPartial": False,
                  "ResultState": RESULT_STATE["aborted" if verdict == "skipped" else "completed"],
                  "JobId": self.run_id, "InternalRecipeId": self.digests.get(result["version"], self.digest),
                  "InternalConfigurationId": str(result["version"]),
                  "CreationTime": when, "ResultEvaluation": EVALUATION.get(verdict, 0), "Verdict": verdict,
                  "Score": float(result["score"] or 0.0), "Threshold": float(result["threshold"] or 0.0),
                  "FrameIndex": seq, "Regions": result["regions"], "BundleVersion": result["version"]}
        nodeid, names = self.source_vars[label]
        written = self.written[label]
        for name, value in (*fields.items(), ("Frames", counts[0]), ("NgFrames", counts[1])):
            if written.get(name) != value or name == "CreationTime":  # a PLC sees each result's time change
                await self._write(names[name], value, self.kinds[name], when)
                written[name] = value
        event = self.results.event
        for name, value in fields.items():
            setattr(event, name, value)
        event.SourceNode, event.SourceName, event.Severity = nodeid, label, 700 if verdict == "NG" else 100
        await self.results.trigger(time_attr=when, message=f"{label}: {verdict}")

    async def use_bundle(self, bundle: dict) -> None:
        """The version judging from now on (at the start and after a hot swap)."""
        self.version, self.digest = bundle["version"], bundle["digest"]
        self.digests[self.version] = self.digest
        kinds = self.ua.VariantType
        await self._write(self.vars["BundleVersion"], self.version, kinds.UInt32)
        await self._write(self.vars["BundleDigest"], self.digest, kinds.String)

    async def alarm(self, event: dict) -> None:
        """A health alarm raised or cleared: ActiveAlarms, State and a HealthAlarm event."""
        raised = event.get("state") == "raised"
        if raised:
            self.active_alarms[event["id"]] = event.get("message", "")
        else:
            self.active_alarms.pop(event.get("id"), None)
        kinds = self.ua.VariantType
        await self._write(self.vars["ActiveAlarms"], list(self.active_alarms.values()), kinds.String)
        await self._write(self.vars["State"], "Alarm" if self.active_alarms else "Operational", kinds.String)
        fields = self.alarms.event
        fields.AlarmId, fields.Kind, fields.Active = event.get("id", ""), event.get("kind", ""), raised
        fields.Severity = 800 if raised else 100
        fields.SourceName = event.get("source") or "edge-inspect"
        text = event.get("message") or event.get("kind") or "alarm"  # never empty: asyncua would keep the last one
        await self.alarms.trigger(message=text if raised else f"cleared: {text}")

    async def stop(self) -> None:
        await self._write(self.vars["State"], "Halted", self.ua.VariantType.String)
        await asyncio.sleep(HALTED_GRACE_S)  # a subscription's next publishing carries it
        await self.server.stop()
