"""OPC UA for the line's PLC: a real asyncua client against a real inspect-run on real images: every result in
order through a subscription while other clients stall, drop off or send garbage; security (user name and
password, encrypted endpoints, trusted client certificates); bad endpoints as one-line errors; the page's footer."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID
from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.runtime.outputs.plc_opcua import NAMESPACE
from test_plc_modbus import feed, free_port, start_run, stop_run
from typer.testing import CliRunner

RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]
PASSWORD = "line-7-opcua-password"


async def connected(client: Client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.connect()
            return
        except (OSError, asyncio.TimeoutError):
            assert time.monotonic() < deadline, "the OPC UA server did not come up"
            await asyncio.sleep(0.3)


async def node(client: Client, *path: str):
    ns = await client.get_namespace_index(NAMESPACE)
    return await client.nodes.objects.get_child([f"{ns}:{name}" for name in ("EdgeInspect", *path)])


class Results:
    """A PLC's subscription to the ResultReady events: every event's fields, in arrival order."""

    def __init__(self):
        self.events: list = []

    def event_notification(self, event) -> None:
        self.events.append(event)


async def subscribe(client: Client, period_ms: int = 50) -> Results:
    results = Results()
    ns = await client.get_namespace_index(NAMESPACE)
    event_type = await client.nodes.base_event_type.get_child(f"{ns}:ResultReadyEventType")
    subscription = await client.create_subscription(period_ms, results)
    await subscription.subscribe_events(await node(client), event_type, queuesize=0)
    return results


def stalled_subscriber(port: int) -> subprocess.Popen:
    """Another client that subscribes and is then frozen (SIGSTOP): it neither reads nor asks for more."""
    script = (f"import asyncio, sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_plc_opcua import Client, connected, subscribe\n"
              "async def main():\n"
              f"    client = Client('opc.tcp://127.0.0.1:{port}')\n"
              "    await connected(client)\n    await subscribe(client)\n    print('subscribed', flush=True)\n"
              "    await asyncio.sleep(600)\n"
              "asyncio.run(main())\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "subscribed"
    process.send_signal(signal.SIGSTOP)
    return process


def misbehaving_clients(port: int, stop: threading.Event) -> list[threading.Thread]:
    """One client sends garbage; another subscribes and drops the connection mid-subscription, again and again."""
    def garbage():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(b"HELF" + os.urandom(300))
            except OSError:
                pass
            time.sleep(0.05)

    def drop_off():
        async def once():
            client = Client(f"opc.tcp://127.0.0.1:{port}")
            await connected(client)
            await subscribe(client)
            await asyncio.sleep(0.2)
            client.uaclient.protocol.transport.abort()  # gone without closing its session
        while not stop.is_set():
            try:
                asyncio.run(once())
            except Exception:  # noqa: BLE001 - the connection it dropped
                pass

    threads = [threading.Thread(target=target, daemon=True) for target in (garbage, drop_off)]
    for thread in threads:
        thread.start()
    return threads


def test_a_plc_subscription_gets_every_result_in_order_over_1000_frames(patchcore_bundle, mvtec_like, tmp_path):
    """1,000 frames (half with a pasted defect) through inspect-run --opcua while a frozen subscriber, a client
    dropping off mid-subscription and a garbage sender are connected: the PLC's subscription receives all 1,000
    results in seq order, each with the log's verdict, score and threshold, and LastResult and the counters agree
    with the log at the end."""
    images = [p for pair in zip(sorted((mvtec_like / "test" / "good").iterdir()),
                                sorted((mvtec_like / "test" / "pasted").iterdir())) for p in pair]
    folder, out, port = tmp_path / "incoming", tmp_path / "out", free_port()
    folder.mkdir()
    process = start_run(patchcore_bundle, folder, out, "--opcua", f"opc.tcp://127.0.0.1:{port}")
    stop = threading.Event()
    frozen = None

    async def plc() -> tuple[list, dict]:
        client = Client(f"opc.tcp://127.0.0.1:{port}")
        await connected(client)
        async with client:
            results = await subscribe(client)
            await asyncio.sleep(0.5)
            feed(images, folder, 1000, tmp_path / "scratch")
            deadline = time.monotonic() + 240
            while len(results.events) < 1000:
                assert time.monotonic() < deadline, f"{len(results.events)} of 1,000 results"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            source = results.events[0].SourceName
            last = {name: await (await node(client, "Sources", source, *path)).read_value()
                    for name, path in (("frames", ("Frames",)), ("ng", ("NgFrames",)),
                                       ("seq", ("LastResult", "FrameIndex")),
                                       ("verdict", ("LastResult", "Verdict")))}
            return results.events, last

    try:
        frozen = stalled_subscriber(port)
        misbehaving = misbehaving_clients(port, stop)
        events, last = asyncio.run(plc())
        stop.set()
        for thread in misbehaving:
            thread.join(timeout=10)
        output = stop_run(process)
    finally:
        stop.set()
        if frozen is not None:
            frozen.kill()
            frozen.wait()
        stop_run(process)
    assert process.returncode == 0 and "Traceback" not in output, output
    frames = [json.loads(line) for line in (out / "inspections.jsonl").read_text().splitlines()]
    frames = [line for line in frames if "seq" in line]
    assert len(frames) == 1000 and len(events) == 1000
    assert [event.FrameIndex for event in events] == list(range(1000))
    for event, record in zip(events, frames):
        assert (event.Verdict, event.ResultEvaluation) == (record["verdict"], {"OK": 1, "NG": 2}[record["verdict"]])
        assert event.Score == pytest.approx(record["score"]) and event.Threshold == pytest.approx(record["threshold"])
        assert event.SourceName == record["source"] and event.ResultId == f"{record['run']}/{record['seq']}"
    ng = sum(record["verdict"] == "NG" for record in frames)
    assert ng >= 400 and last == {"frames": 1000, "ng": ng, "seq": 999, "verdict": frames[-1]["verdict"]}


async def client_certificate(folder: Path, uri: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    key, certificate = folder / "key.pem", folder / "certificate.der"
    await cert_gen.setup_self_signed_certificate(key, certificate, uri, "localhost",
                                                 [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": uri})
    return key, certificate


async def secure_read(port: int, uri: str, key: Path, certificate: Path, username: str, password: str) -> str:
    """The run's State read over Basic256Sha256 (signed and encrypted), or the status code it was refused with."""
    client = Client(f"opc.tcp://127.0.0.1:{port}")
    client.application_uri = uri
    client.set_user(username)
    client.set_password(password)
    await client.set_security(SecurityPolicyBasic256Sha256, str(certificate), str(key),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    try:
        async with client:
            return await (await node(client, "State")).read_value()
    except ua.UaStatusCodeError as error:
        return type(error).__name__


async def read_naming_no_certificate(port: int, uri: str, key: Path, certificate: Path, username: str,
                                     password: str) -> str:
    """As secure_read, but the session is created naming no client certificate (asyncua's own check is then
    skipped): the certificate the channel is signed with must be trusted all the same."""
    client = Client(f"opc.tcp://127.0.0.1:{port}")
    client.application_uri = uri
    await client.set_security(SecurityPolicyBasic256Sha256, str(certificate), str(key),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        client.security_policy.host_certificate = None
        client.security_policy.asymmetric_cryptography.verify = lambda *_: None  # the client's own check of the
        await client.create_session()  # server's signature, which no longer covers what this client expects
        await client.activate_session(username, password)
        return await (await node(client, "State")).read_value()
    except ua.UaStatusCodeError as error:
        return type(error).__name__
    finally:
        client.disconnect_socket()


def test_security_refuses_a_wrong_password_and_an_untrusted_certificate(patchcore_bundle, mvtec_like, tmp_path):
    """With a user name the server offers signed and encrypted endpoints only: an unknown client certificate is
    refused and kept in PKI/rejected; moved to PKI/trusted it is let in (no restart); a wrong password is refused,
    as is anonymous access without encryption, another unknown certificate (said without a traceback), and one that
    signs the channel but is left out of the session. The server's key is owner-only, and the password appears
    nowhere in the run's output or its files."""
    port, out = free_port(), tmp_path / "out"
    pki = out / "opcua-pki"
    process = start_run(patchcore_bundle, mvtec_like / "test" / "good", out, "--opcua",
                        f"opc.tcp://127.0.0.1:{port}", "--opcua-username", "plc",
                        env={"EDGE_INSPECT_OPCUA_PASSWORD": PASSWORD})

    async def attempts() -> dict:
        uri = "urn:line7:plc"
        key, certificate = await client_certificate(tmp_path / "plc", uri)
        deadline = time.monotonic() + 90
        while True:  # the server listening
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the OPC UA server did not come up"
                await asyncio.sleep(0.3)
        seen = {}
        try:
            await Client(f"opc.tcp://127.0.0.1:{port}").connect()
        except ua.UaError as error:
            seen["anonymous"] = str(error)
        seen["untrusted"] = await secure_read(port, uri, key, certificate, "plc", PASSWORD)
        seen["rejected"] = sorted(path.suffix for path in (pki / "rejected").iterdir())
        for path in (pki / "rejected").iterdir():
            path.rename(pki / "trusted" / path.name)
        seen["trusted"] = await secure_read(port, uri, key, certificate, "plc", PASSWORD)
        seen["wrong password"] = await secure_read(port, uri, key, certificate, "plc", PASSWORD + "x")
        intruder = "urn:elsewhere:client"
        other_key, other_certificate = await client_certificate(tmp_path / "intruder", intruder)
        seen["other"] = await secure_read(port, intruder, other_key, other_certificate, "plc", PASSWORD)
        seen["left out"] = await read_naming_no_certificate(port, intruder, other_key, other_certificate, "plc",
                                                            PASSWORD)
        return seen

    try:
        seen = asyncio.run(attempts())
        output = stop_run(process)
    finally:
        stop_run(process)
    assert "No matching endpoints" in seen["anonymous"], seen
    assert seen["untrusted"] == "BadCertificateUntrusted" and seen["rejected"] == [".der"], seen
    assert seen["trusted"] in ("Operational", "Alarm") and seen["wrong password"] == "BadUserAccessDenied", seen
    assert seen["other"] == "BadCertificateUntrusted" and seen["left out"] == "BadUserAccessDenied", seen
    assert "Traceback" not in output, output
    assert "wrong user name or password" in output and "is not trusted" in output, output
    assert (pki / "own" / "key.pem").stat().st_mode & 0o777 == 0o600 and pki.stat().st_mode & 0o777 == 0o700
    assert PASSWORD not in output
    for path in out.rglob("*"):
        assert not path.is_file() or PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("args, message", [
    (["--opcua", "http://127.0.0.1:4840"], "give opc.tcp://HOST:PORT"),
    (["--opcua", "opc.tcp://127.0.0.1:99999"], "port 1 to 65535"),
    (["--opcua", "opc.tcp://:4840"], "give opc.tcp://HOST:PORT"),
    (["--opcua", "opc.tcp://0.0.0.0:4840"], "anonymous access is for loopback only"),
    (["--opcua", "opc.tcp://127.0.0.1:4840", "--opcua-username", "plc"], "needs a password"),
    (["--opcua", "opc.tcp://192.0.2.1:4840", "--opcua-username", "plc", "--opcua-password", "x"],
     "cannot listen there"),
])
def test_bad_opcua_options_are_one_line_errors(patchcore_bundle, mvtec_like, tmp_path, args, message):
    result = CliRunner().invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                          "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1


def test_the_operators_page_says_which_plcs_are_connected(patchcore_bundle, mvtec_like, tmp_path):
    """stats.json (the page's footer) names both servers and counts the clients connected to each."""
    from pymodbus.client import ModbusTcpClient
    from test_operator_page import inspect_run, stats_of, wait_until

    modbus, opcua = free_port(), free_port()
    with inspect_run(patchcore_bundle, tmp_path / "out", "--source", mvtec_like / "test" / "good", "--watch",
                     "--modbus", f"127.0.0.1:{modbus}", "--opcua", f"opc.tcp://127.0.0.1:{opcua}") as run:
        assert wait_until(lambda: stats_of(run)["plc"], 30, "the PLC status") == [
            {"protocol": "Modbus", "address": f"127.0.0.1:{modbus}", "clients": 0, "running": True},
            {"protocol": "OPC UA", "address": f"opc.tcp://127.0.0.1:{opcua}", "clients": 0, "running": True}]
        plc = ModbusTcpClient("127.0.0.1", port=modbus)
        assert plc.connect()
        wait_until(lambda: [s["clients"] for s in stats_of(run)["plc"]] == [1, 0], 30, "one Modbus client")

        async def opcua_client():
            async with Client(f"opc.tcp://127.0.0.1:{opcua}"):
                wait_until(lambda: [s["clients"] for s in stats_of(run)["plc"]] == [1, 1], 30, "an OPC UA client")
        asyncio.run(opcua_client())
        plc.close()
        wait_until(lambda: [s["clients"] for s in stats_of(run)["plc"]] == [0, 0], 30, "no client")


def test_health_alarms_reach_the_plc_as_events(patchcore_bundle, mvtec_like, tmp_path):
    """Ten defective parts in a row raise the NG-rate alarm: the PLC gets a HealthAlarm event (Active) and reads
    State "Alarm" and the message in ActiveAlarms; good parts after them clear it (an event, State back to
    "Operational")."""
    folder, port = tmp_path / "incoming", free_port()
    folder.mkdir()
    config = tmp_path / "line.toml"
    config.write_text("[alarms]\nwindow = 10\nmin_frames = 5\n")
    process = start_run(patchcore_bundle, folder, tmp_path / "out", "--opcua", f"opc.tcp://127.0.0.1:{port}",
                        "--config", str(config))

    async def plc() -> tuple[list, list]:
        client = Client(f"opc.tcp://127.0.0.1:{port}")
        await connected(client)
        async with client:
            alarms = Results()
            ns = await client.get_namespace_index(NAMESPACE)
            event_type = await client.nodes.base_event_type.get_child(f"{ns}:HealthAlarmEventType")
            subscription = await client.create_subscription(50, alarms)
            await subscription.subscribe_events(await node(client), event_type, queuesize=0)
            feed(sorted((mvtec_like / "test" / "pasted").iterdir()), folder, 10, tmp_path / "defects")
            deadline = time.monotonic() + 90
            while not alarms.events:
                assert time.monotonic() < deadline, "no NG-rate alarm"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            states = [(await (await node(client, "State")).read_value(),
                       await (await node(client, "ActiveAlarms")).read_value())]
            feed(sorted((mvtec_like / "test" / "good").iterdir())[:4], folder, 12, tmp_path / "good")  # all OK
            while len(alarms.events) < 2:
                assert time.monotonic() < deadline, "the NG-rate alarm was not cleared"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            states.append(await (await node(client, "State")).read_value())
            return alarms.events, states

    try:
        events, states = asyncio.run(plc())
        output = stop_run(process)
    finally:
        stop_run(process)
    assert process.returncode == 0 and "Traceback" not in output, output
    assert [(event.Kind, event.Active) for event in events[:2]] == [("ng-rate", True), ("ng-rate", False)]
    assert events[0].Severity > events[1].Severity
    (state, active), cleared_state = states
    assert state == "Alarm" and len(active) == 1 and "NG" in active[0], states
    assert cleared_state == "Operational"
