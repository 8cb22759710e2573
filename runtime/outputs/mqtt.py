"""--mqtt: the verdicts published to the line's MQTT broker, with nothing lost while the broker is down.

    {prefix}/frames     every record (the JSON line, skipped frames included), QoS 1, in order
    {prefix}/ng         the NG records again, for consumers that only want alarms, QoS 1
    {prefix}/status     retained {"state": "online"|"offline", "run", "time"}; the last will (the run died or
                        lost the broker without a goodbye) is {"state": "offline", "run", "will": true}
    {prefix}/heartbeat  every heartbeat_s: {"run", "time", "stats": stats(), "queue": {"depth", "dropped"}}

Frame messages go through an on-disk queue (SQLite in WAL mode, one file): handle() only appends, a publisher
thread sends in order and deletes a message only after the broker's PUBACK, so a broker outage or a restart of
inspect-run loses nothing. A message may arrive twice (sent again after a lost PUBACK): consumers drop
duplicates by the record's ("run", "seq"). Status and heartbeat are sent only while connected: a stale one is
worth nothing and must not take the queue's room.
"""

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from edgeinspect.runtime.console import InspectError, RateLimitedWarning, warn
from edgeinspect.runtime.outputs.sinks import Inspected, Sink

WINDOW = 32  # frame messages in flight (sent, PUBACK awaited) at once: throughput without unbounded memory
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    prefix: str
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}/{self.prefix}"


MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name


def parse_mqtt_url(text: str) -> MqttTarget:
    """mqtt://HOST[:PORT]/TOPIC/PREFIX or mqtts://… (TLS); anything else is a one-line error naming --mqtt."""
    usage = "expected mqtt://HOST[:PORT]/TOPIC-PREFIX or mqtts://…"
    try:
        url = urlsplit(text)
    except ValueError as error:  # "Invalid IPv6 URL" for a lone [
        raise InspectError(f"--mqtt {text!r}: not a URL ({error}; {usage})") from None
    if url.scheme not in DEFAULT_PORTS:
        raise InspectError(f"--mqtt {text!r}: the scheme must be mqtt:// or mqtts:// ({usage})")
    if url.username is not None:
        raise InspectError(f"--mqtt {text!r}: give the user name and password as their own options, not in the "
                           "URL (it shows in process lists and logs)")
    if not url.hostname:
        raise InspectError(f"--mqtt {text!r}: no host ({usage})")
    try:
        port = DEFAULT_PORTS[url.scheme] if url.port is None else url.port
    except ValueError:  # not a number, or above 65535
        port = 0
    if not 1 <= port <= 65535:
        raise InspectError(f"--mqtt {text!r}: the port must be a number from 1 to 65535")
    prefix = url.path.strip("/")
    if not prefix:
        raise InspectError(f"--mqtt {text!r}: no topic prefix ({usage})")
    if "+" in prefix or "#" in text or url.query:
        raise InspectError(f"--mqtt {text!r}: the topic prefix must not hold the wildcards + or #, nor a ?query")
    if prefix.startswith("$"):
        raise InspectError(f"--mqtt {text!r}: topics beginning with $ ($SYS/…) are the broker's own; it drops what "
                           "clients publish there")
    try:
        size = len(f"{prefix}/heartbeat".encode("utf-8"))
    except UnicodeEncodeError:
        raise InspectError(f"--mqtt {text!r}: the topic prefix is not valid UTF-8") from None
    if size > MAX_TOPIC_BYTES or "\0" in prefix:
        raise InspectError(f"--mqtt {text!r}: the topic prefix must be at most {MAX_TOPIC_BYTES - 10} bytes of UTF-8 "
                           "without NUL")
    return MqttTarget(url.hostname, port, prefix, url.scheme == "mqtts")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class DiskQueue:
    """Messages waiting for the broker, oldest first, in one SQLite file that outlives the process. `handed`
    is the last id given to the publisher: rows up to it are in flight and are never the ones dropped when the
    queue is full (they may already be delivered). Ids only grow (AUTOINCREMENT), so order holds across runs."""

    def __init__(self, path: Path, max_rows: int):
        self.path, self.max_rows, self.handed, self.dropped = path, max_rows, 0, 0
        self.lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a crash of the process
            self.db.execute("CREATE TABLE IF NOT EXISTS queue "
                            "(id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload TEXT NOT NULL)")
            columns = [row[1] for row in self.db.execute("PRAGMA table_info(queue)")]
            self.db.execute("BEGIN IMMEDIATE")  # takes the write lock: a file we cannot write fails here, not later
            self.db.execute("ROLLBACK")
            self.depth = self.db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        except (OSError, sqlite3.Error) as error:
            raise InspectError(f"--mqtt: cannot use {path} as the message queue ({error}); make it writable, remove "
                               "it, or give another --out") from None
        if columns != ["id", "topic", "payload"]:
            self.db.close()
            raise InspectError(f"--mqtt: {path} holds a queue table of another layout ({', '.join(columns)}); remove "
                               "it, or give another --out")

    def push(self, topic: str, payload: str) -> int:
        """Append one message; when full, drop the oldest not in flight. Returns how many were dropped."""
        with self.lock:
            excess = self.depth + 1 - self.max_rows
            dropped = 0
            if excess > 0:
                dropped = self.db.execute("DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE id > ? "
                                          "ORDER BY id LIMIT ?)", (self.handed, excess)).rowcount
            self.db.execute("INSERT INTO queue (topic, payload) VALUES (?, ?)", (topic, payload))
            self.depth += 1 - dropped
            self.dropped += dropped
            return dropped

    def take(self, count: int) -> list[tuple[int, str, str]]:
        """The next `count` messages not yet handed to the publisher, in order."""
        with self.lock:
            rows = self.db.execute("SELECT id, topic, payload FROM queue WHERE id > ? ORDER BY id LIMIT ?",
                                   (self.handed, count)).fetchall()
            if rows:
                self.handed = rows[-1][0]
            return rows

    def delete(self, ids: list[int]) -> None:
        """Forget messages the broker has acknowledged."""
        with self.lock:
            marks = ",".join("?" * len(ids))
            self.depth -= self.db.execute(f"DELETE FROM queue WHERE id IN ({marks})", ids).rowcount

    def close(self) -> None:
        with self.lock:
            self.db.close()


class MqttSink(Sink):
    """Publishes each record to `{prefix}/frames` (and NG ones to `{prefix}/ng`) through the disk queue, plus
    the retained status and the heartbeat. `stats` is called from the publisher thread, so it must be safe to
    call while the frame loop runs. Connection problems are warnings, never exceptions: the run goes on and
    the queue waits for the broker (paho reconnects by itself, 1 s to 30 s apart)."""

    def __init__(self, target: MqttTarget, queue_path: Path, run_id: str, stats: Callable[[], dict],
                 queue_max: int = 100_000, heartbeat_s: float = 10.0, username: str | None = None,
                 password: str | None = None, ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None, client_id: str | None = None):
        if queue_max < 1:
            raise InspectError(f"--mqtt: the queue must hold at least one message, not {queue_max}")
        self.target, self.run_id, self.stats, self.heartbeat_s = target, run_id, stats, heartbeat_s
        self.client = self._client(username, password, ca_file, cert_file, key_file, client_id)
        self.queue = DiskQueue(Path(queue_path), queue_max)
        self.warn = RateLimitedWarning()
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.in_flight: dict[int, int] = {}  # paho message id → queue row id; the publisher thread's, then close's
        self.client.connect_async(target.host, target.port)
        self.client.loop_start()
        self.publisher = threading.Thread(target=self._publish_loop, name="mqtt-publisher", daemon=True)
        self.publisher.start()

    @property
    def queued(self) -> int:
        return self.queue.depth

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def topic(self, name: str) -> str:
        return f"{self.target.prefix}/{name}"

    def status(self, state: str) -> str:
        return json.dumps({"state": state, "run": self.run_id, "time": now_iso()})

    def _client(self, username, password, ca_file, cert_file, key_file, client_id) -> mqtt.Client:
        """A paho client with the last will, credentials and TLS set, and our callbacks."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=True)
        will = {"state": "offline", "run": self.run_id, "will": True}
        client.will_set(self.topic("status"), json.dumps(will), qos=1, retain=True)
        if username is not None:
            client.username_pw_set(username, password)
        if self.target.tls or ca_file or cert_file:
            try:
                client.tls_set(ca_certs=ca_file and str(ca_file), certfile=cert_file and str(cert_file),
                               keyfile=key_file and str(key_file))
            except OSError as error:  # a missing or unreadable CA, certificate or key (ssl.SSLError included)
                raise InspectError(f"--mqtt: cannot set up TLS: {error}") from None
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(WINDOW + 2)  # room for a status or heartbeat beside the frames
        client.on_connect, client.on_connect_fail = self._on_connect, self._on_connect_fail
        client.on_disconnect, client.on_publish = self._on_disconnect, self._on_publish
        return client

    def handle(self, item: Inspected) -> None:
        """Queue the record on disk and return at once: the frame loop never waits for the network."""
        payload = json.dumps(item.record, separators=(",", ":"))
        self.publish("frames", payload)
        if item.verdict == "NG":
            self.publish("ng", payload)

    def publish(self, name: str, payload: str) -> None:
        """Queue a message for {prefix}/{name} (QoS 1, in order with the rest, kept on disk until its PUBACK)."""
        if self.queue.push(self.topic(name), payload):
            self.warn("dropped", f"MQTT queue {self.queue.path} is full ({self.queue.max_rows} messages): "
                                 f"dropping the oldest ({self.queue.dropped} dropped so far)")
        self.wake.set()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.warn("connection", f"MQTT broker {self.target} refused the connection: {reason}; "
                                    f"{self.queue.depth} messages wait in {self.queue.path}")
            return
        client.publish(self.topic("status"), self.status("online"), qos=1, retain=True)
        self.wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self.warn("connection", f"MQTT broker {self.target} unreachable; messages wait in {self.queue.path} "
                                "and go out when it is back")

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self.warn("connection", f"MQTT connection to {self.target} lost ({reason}); messages wait in "
                                    f"{self.queue.path} and go out when it is back")

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        """Called on paho's thread, under its locks: only hand the id over to the publisher thread."""
        self.acks.put(mid)
        self.wake.set()

    def _publish_loop(self) -> None:
        """The publisher thread: settle PUBACKs, keep the window full, beat the heart. It never dies of an
        error, or delivery would stop for the rest of the run unnoticed."""
        next_beat = time.monotonic() + self.heartbeat_s
        while not self.stopping.is_set():
            self.wake.wait(max(0.0, min(1.0, next_beat - time.monotonic())))
            self.wake.clear()
            try:
                self._settle()
                if self.client.is_connected():
                    self._send()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    self._heartbeat()
            except Exception as error:  # noqa: BLE001 - said (rate-limited), then the loop goes on
                self.warn("publisher", f"MQTT publisher: {type(error).__name__}: {error}")
                time.sleep(0.1)

    def _settle(self) -> None:
        """Delete from disk the messages the broker acknowledged (ids of status/heartbeat are not ours)."""
        acked = []
        while not self.acks.empty():
            row = self.in_flight.pop(self.acks.get(), None)
            if row is not None:
                acked.append(row)
        if acked:
            self.queue.delete(acked)

    def _send(self) -> None:
        """Publish the next queued messages, in order. paho keeps a sent message until its PUBACK and sends it
        again after a reconnect, so each row is handed over exactly once per run."""
        for row, topic, payload in self.queue.take(WINDOW - len(self.in_flight)):
            self.in_flight[self.client.publish(topic, payload, qos=1).mid] = row

    def _heartbeat(self) -> None:
        if not self.client.is_connected():
            return
        try:
            stats = self.stats()
        except Exception as error:  # noqa: BLE001 - the heartbeat still says the run is alive
            stats = {"error": f"{type(error).__name__}: {error}"}
        beat = {"run": self.run_id, "time": now_iso(), "stats": stats,
                "queue": {"depth": self.queue.depth, "dropped": self.queue.dropped}}
        self.client.publish(self.topic("heartbeat"), json.dumps(beat, default=str), qos=1)

    def close(self, timeout_s: float = 3.0) -> None:
        """Deliver what is queued within `timeout_s`, say offline (retained), disconnect. What is left stays on
        disk and goes out with the next run on the same queue file."""
        deadline = time.monotonic() + timeout_s
        while self.queue.depth and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stopping.set()
        self.wake.set()
        self.publisher.join()
        self._say_offline(max(1.0, deadline - time.monotonic()))
        self.client.disconnect()
        self.client.loop_stop()
        left = self.queue.depth
        self.queue.close()
        if left:
            warn(f"{left} MQTT messages could not be delivered to {self.target}; they stay in {self.queue.path} "
                 "and go out with the next run that uses it")

    def _say_offline(self, timeout_s: float) -> None:
        """The retained offline status, since a clean disconnect does not fire the last will. Acks that come
        meanwhile are settled, so delivered messages are not sent again next run."""
        if self.client.is_connected():
            info = self.client.publish(self.topic("status"), self.status("offline"), qos=1, retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                info.wait_for_publish(timeout_s)
        self._settle()
