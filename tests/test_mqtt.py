"""--mqtt against a real Mosquitto broker (Debian package mosquitto), started on 127.0.0.1 on a free port and
stopped and restarted by the tests: every frame's message arrives, in order, also across a broker outage, a
restart of the run, and a kill -9 of the publisher (the retained last will)."""

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.outputs.mqtt import MqttSink, MqttTarget, parse_mqtt_url
from edgeinspect.runtime.outputs.sinks import Inspected

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ["/usr/sbin/mosquitto"] if Path(p).is_file()), None)
PREFIX = "plant/line1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def mosquitto_or_skip() -> str:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    return MOSQUITTO


class Broker:
    """A Mosquitto on 127.0.0.1:PORT (anonymous) with persistence in its folder, so that a restarted broker
    still holds the persistent subscriber's session and the QoS-1 messages queued for it; `more` adds
    configuration lines (another listener)."""

    def __init__(self, folder: Path, more: str = ""):
        self.port, self.folder, self.process = free_port(), folder, None
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"per_listener_settings true\npersistence true\npersistence_location {folder}/\n"
                               f"max_queued_messages 0\nuser {getpass.getuser()}\n"
                               f"log_dest file {folder}/mosquitto.log\n"
                               f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{more}")

    def start(self) -> None:
        self.process = subprocess.Popen([mosquitto_or_skip(), "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        wait_until(self.accepts, 10, "mosquitto to listen")

    def accepts(self) -> bool:
        assert self.process.poll() is None, (self.folder / "mosquitto.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)

    def target(self) -> MqttTarget:
        return MqttTarget("127.0.0.1", self.port, PREFIX, False)


@pytest.fixture
def broker(tmp_path):
    mosquitto_or_skip()
    folder = tmp_path / "broker"
    folder.mkdir()
    running = Broker(folder)
    running.start()
    yield running
    running.process.kill()  # also when a failed test left it stopped (SIGSTOP)
    running.process.wait()


class Subscriber:
    """A paho client subscribed at QoS 1 to {PREFIX}/#, collecting (topic, message, retained) as they come;
    with a fixed client id and clean_session=False its session outlives a broker restart."""

    def __init__(self, port: int, client_id: str, persistent: bool = True, topic: str = f"{PREFIX}/#"):
        self.messages, self.lock, self.subscribed = [], threading.Lock(), threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscriber could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, json.loads(message.payload), message.retain))

    def on(self, name: str) -> list[dict]:
        with self.lock:
            return [body for topic, body, _ in self.messages if topic == f"{PREFIX}/{name}"]

    def distinct_seqs(self, name: str = "frames") -> list[int]:
        """Seq values in first-arrival order, duplicates dropped by (run, seq) as a consumer does."""
        seen, order = set(), []
        for body in self.on(name):
            if (body["run"], body["seq"]) not in seen:
                seen.add((body["run"], body["seq"]))
                order.append(body["seq"])
        return order

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker):
    listening = Subscriber(broker.port, "edge-inspect-test-subscriber")
    yield listening
    listening.close()


def retained_status(port: int) -> dict:
    """What a subscriber arriving now gets on {PREFIX}/status: the retained message."""
    late = Subscriber(port, "", persistent=False, topic=f"{PREFIX}/status")
    try:
        wait_until(lambda: late.messages, 5, "the retained status")
        _, body, retained = late.messages[0]
        assert retained
        return body
    finally:
        late.close()


def record(seq: int, run: str = "run-1") -> dict:
    """A frame's record as the frame loop writes it: every 7th NG, every 50th a skipped frame."""
    base = {"run": run, "seq": seq, "frame": f"{seq:05d}.png", "source": "cam0", "time": "2025-01-01T00:00:00Z"}
    if seq % 50 == 49:
        return {**base, "skipped": "could not decode"}
    return {**base, "score": 0.1 + (seq % 7 == 3), "threshold": 0.5, "verdict": "NG" if seq % 7 == 3 else "OK"}


def sink_for(target: MqttTarget, tmp_path: Path, **options) -> MqttSink:
    return MqttSink(target, tmp_path / "queue" / "mqtt.sqlite", "run-1", lambda: {"frames": 2000, "ng": 286},
                    **options)


def test_every_frame_arrives_in_order_with_ng_status_and_heartbeat(broker, subscriber, tmp_path):
    sink = sink_for(broker.target(), tmp_path, heartbeat_s=0.3)
    records = [record(i) for i in range(2000)]
    for each in records:
        sink.handle(Inspected(record=each))
    wait_until(lambda: len(subscriber.on("frames")) >= 2000 and subscriber.on("heartbeat"), 15, "2,000 frames")
    online = retained_status(broker.port)
    assert (online["state"], online["run"]) == ("online", "run-1")
    sink.close()

    assert subscriber.on("frames") == records
    assert subscriber.on("ng") == [each for each in records if each.get("verdict") == "NG"]
    beat = subscriber.on("heartbeat")[0]
    assert beat["run"] == "run-1" and beat["stats"] == {"frames": 2000, "ng": 286}
    assert set(beat["queue"]) == {"depth", "dropped"} and beat["queue"]["dropped"] == 0
    assert [status["state"] for status in subscriber.on("status")] == ["online", "offline"]
    assert retained_status(broker.port)["state"] == "offline"
    assert sink.queued == 0


def test_a_broker_outage_loses_nothing_and_keeps_the_order(broker, subscriber, tmp_path, capsys):
    sink = sink_for(broker.target(), tmp_path)
    for i in range(2000):
        sink.handle(Inspected(record=record(i)))
        if i == 600:
            broker.stop()
        if i == 1300:
            broker.start()
        time.sleep(0.0015)  # a steady frame rate: the broker is away for about a second
    sink.close(timeout_s=30)
    wait_until(lambda: len(set(subscriber.distinct_seqs())) >= 2000, 15, "2,000 distinct frames")

    assert subscriber.distinct_seqs() == list(range(2000))
    assert sink.queued == 0
    assert "MQTT connection to" in capsys.readouterr().err


def test_what_could_not_be_sent_goes_out_with_the_next_run(broker, subscriber, tmp_path, capsys):
    nobody = MqttTarget("127.0.0.1", free_port(), PREFIX, False)
    sink = sink_for(nobody, tmp_path)
    for i in range(50):
        sink.handle(Inspected(record=record(i)))
    sink.close(timeout_s=1)
    assert "57 MQTT messages could not be delivered" in capsys.readouterr().err  # 50 frames, 7 of them NG

    next_run = sink_for(broker.target(), tmp_path)
    next_run.close()
    wait_until(lambda: len(subscriber.on("frames")) >= 50, 10, "the 50 frames left by the first run")
    assert subscriber.distinct_seqs() == list(range(50))


def test_a_message_leaves_the_disk_only_after_its_puback(broker, subscriber, tmp_path):
    """The broker freezes (SIGSTOP: no PUBACKs) with a window of messages sent, then dies with them unread
    (SIGKILL): they were never acknowledged, so they are still on disk and the next run sends them."""
    sink = sink_for(broker.target(), tmp_path)
    wait_until(lambda: subscriber.on("status"), 5, "the sink to connect")
    broker.process.send_signal(signal.SIGSTOP)
    for i in range(50):
        sink.handle(Inspected(record={**record(i), "verdict": "OK"}))
    wait_until(lambda: sink.in_flight, 5, "messages to be sent")
    sink.close(timeout_s=0.5)
    assert sink.queued == 50
    broker.process.kill()
    broker.process.wait()
    subscriber.subscribed.clear()
    broker.start()
    assert subscriber.subscribed.wait(10), "the subscriber did not come back"

    sink_for(broker.target(), tmp_path).close()
    wait_until(lambda: len(subscriber.distinct_seqs()) >= 50, 10, "the 50 unacknowledged frames")
    assert subscriber.distinct_seqs() == list(range(50))


def test_a_full_queue_drops_the_oldest_and_counts_them(broker, subscriber, tmp_path, capsys):
    nobody = MqttTarget("127.0.0.1", free_port(), PREFIX, False)
    sink = sink_for(nobody, tmp_path, queue_max=100)
    for i in range(150):
        sink.handle(Inspected(record={**record(i), "verdict": "OK"}))
    assert (sink.queued, sink.dropped) == (100, 50)
    sink.close(timeout_s=0)
    assert capsys.readouterr().err.count("is full (100 messages)") == 1

    sink_for(broker.target(), tmp_path).close()
    wait_until(lambda: len(subscriber.on("frames")) >= 100, 10, "the 100 frames kept")
    assert subscriber.distinct_seqs() == list(range(50, 150))


def test_tls_with_a_user_name_and_password(tmp_path, capsys):
    """mqtts:// checked against the broker's own CA, with a user name and password; a wrong password is a
    warning and the messages wait, not an exception."""
    mosquitto_or_skip()
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl or mosquitto_passwd is not installed")
    folder = tmp_path / "broker"
    folder.mkdir()
    cert, key, passwords, secure = folder / "cert.pem", folder / "key.pem", folder / "passwords", free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert], check=True,
                   capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", "-c", passwords, "line1", "secret"], check=True, capture_output=True)
    broker = Broker(folder, f"listener {secure} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
                            f"password_file {passwords}\nallow_anonymous false\n")
    broker.start()
    subscriber = Subscriber(broker.port, "edge-inspect-test-subscriber")
    target = MqttTarget("127.0.0.1", secure, PREFIX, True)
    try:
        refused = MqttSink(target, tmp_path / "refused.sqlite", "run-0", dict, username="line1", password="wrong",
                           ca_file=cert)
        refused.handle(Inspected(record=record(0, "run-0")))
        refused.close(timeout_s=1)
        assert "refused the connection" in capsys.readouterr().err

        sink = MqttSink(target, tmp_path / "queue.sqlite", "run-1", dict, username="line1", password="secret",
                        ca_file=cert)
        for i in range(20):
            sink.handle(Inspected(record=record(i)))
        sink.close()
        wait_until(lambda: len(subscriber.on("frames")) >= 20, 10, "20 frames over TLS")
        assert subscriber.distinct_seqs() == list(range(20))
    finally:
        subscriber.close()
        broker.process.kill()
        broker.process.wait()


def test_a_missing_ca_file_is_a_one_line_error(tmp_path):
    with pytest.raises(InspectError, match="^--mqtt: cannot set up TLS"):
        MqttSink(MqttTarget("broker", 8883, PREFIX, True), tmp_path / "queue.sqlite", "run-1", dict,
                 ca_file=tmp_path / "missing.pem")
    assert not (tmp_path / "queue.sqlite").exists()


SINK_THAT_GETS_KILLED = """
import sys, time
from pathlib import Path
from edgeinspect.runtime.outputs.mqtt import MqttSink, MqttTarget
from edgeinspect.runtime.outputs.sinks import Inspected
sink = MqttSink(MqttTarget("127.0.0.1", int(sys.argv[1]), sys.argv[2], False), Path(sys.argv[3]), "run-will", dict)
sink.handle(Inspected(record={"run": "run-will", "seq": 0, "frame": "a.png", "source": "cam0", "time": "t"}))
while sink.queued:
    time.sleep(0.01)
print("delivered", flush=True)
time.sleep(60)
"""


def test_a_killed_run_leaves_the_retained_offline_will(broker, subscriber, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SINK_THAT_GETS_KILLED, str(broker.port), PREFIX,
                              str(tmp_path / "will.sqlite")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "delivered"
        assert retained_status(broker.port)["state"] == "online"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    wait_until(lambda: [s["state"] for s in subscriber.on("status")] == ["online", "offline"], 5, "the will")
    assert retained_status(broker.port) == {"state": "offline", "run": "run-will", "will": True}


@pytest.mark.parametrize("url, target", [
    ("mqtt://broker.local/plant/line1", MqttTarget("broker.local", 1883, "plant/line1", False)),
    ("mqtts://10.0.0.5/line1/", MqttTarget("10.0.0.5", 8883, "line1", True)),
    ("mqtt://[::1]:1884/cell", MqttTarget("::1", 1884, "cell", False)),
])
def test_mqtt_urls(url, target):
    assert parse_mqtt_url(url) == target


@pytest.mark.parametrize("url, says", [
    ("http://broker/line1", "scheme"), ("broker:1883/line1", "scheme"), ("mqtt:///line1", "no host"),
    ("mqtt://broker:99999/line1", "port"), ("mqtt://broker:abc/line1", "port"),
    ("mqtt://broker:0/line1", "port"), ("mqtt://broker", "no topic prefix"),
    ("mqtt://broker/", "no topic prefix"), ("mqtt://user:secret@broker/line1", "not in the URL"),
    ("mqtt://broker/line1/#", "wildcards"),
])
def test_bad_mqtt_urls_are_one_line_errors(url, says):
    with pytest.raises(InspectError) as error:
        parse_mqtt_url(url)
    message = str(error.value)
    assert message.startswith("--mqtt ") and says in message and "\n" not in message


@pytest.mark.slow
def test_inspect_run_publishes_every_frame_through_a_broker_outage(broker, subscriber, patchcore_bundle, mvtec_like,
                                                                   tmp_path):
    """The whole path: inspect-run on a looped video, 2,000 frames, the broker stopped for the middle third."""
    import cv2

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 96))
    for image in sorted((mvtec_like / "test" / "pasted").iterdir()) + sorted((mvtec_like / "test" / "good").iterdir()):
        writer.write(cv2.imread(str(image)))
    writer.release()
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()", str(patchcore_bundle),
               "--source", str(video), "--loop", "--max-frames", "2000", "--save", "none", "--out", str(out),
               "--mqtt", f"mqtt://127.0.0.1:{broker.port}/{PREFIX}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "inspections.jsonl"

    def logged() -> int:
        return log.read_bytes().count(b"\n") if log.is_file() else 0

    wait_until(lambda: logged() >= 667, 120, "a third of the frames")
    broker.stop()
    wait_until(lambda: logged() >= 1333, 120, "two thirds of the frames")
    broker.start()
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 0, errors[-3000:]
    wait_until(lambda: len(subscriber.distinct_seqs()) >= 2000, 30, "2,000 distinct frame messages")
    assert subscriber.distinct_seqs() == list(range(2000))
    runs = {body["run"] for body in subscriber.on("frames")}
    assert runs == {json.loads((out / "summary.json").read_text())["run"]}
