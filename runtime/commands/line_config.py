"""The line config file (`inspect-run --config line.toml`): everything inspect-run's flags say, in one file to keep
in version control, review and copy to the next box. One schema checks it (a bad key or value is one line naming
it); a flag given on the command line overrides the file; relative paths are relative to the file's folder.

Secrets never stand in the file: a password is a reference, `{ env = "NAME" }` (an environment variable),
`{ file = "PATH" }` (a file holding it, e.g. a container secret) or `{ credential = "NAME" }` (systemd's
LoadCredential=, read from $CREDENTIALS_DIRECTORY). `inspect-run … --print-config` writes the flags of a command
line as such a file, with references in place of the passwords it was given."""

import os
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6): the same parser as a package
    import tomli as tomllib

from edgeinspect.runtime.capture.sources import with_credentials, without_credentials
from edgeinspect.runtime.console import InspectError, warn
from edgeinspect.runtime.outputs.health import Limits
from edgeinspect.runtime.schema import check_record, strict_validator

# inspect-run's password options → where the file holds them, and the environment variable --print-config names
PASSWORDS = {"mqtt_password": ("mqtt.password", "EDGE_INSPECT_MQTT_PASSWORD"),
             "opcua_password": ("opcua.password", "EDGE_INSPECT_OPCUA_PASSWORD")}

_SECRET = {
    "type": "object", "x-secret": True, "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
    "properties": {"env": {"type": "string", "minLength": 1}, "file": {"type": "string", "minLength": 1},
                   "credential": {"type": "string", "minLength": 1}},
    "x-message": 'a reference, { env = "NAME" }, { file = "PATH" } or { credential = "NAME" } (a secret never '
                 "stands in the file itself)",
}
_TEXT = {"type": "string", "minLength": 1, "x-message": "a non-empty string"}
_FLAG = {"type": "boolean", "x-message": "true or false"}


def _whole(low: int, high: int | None = None) -> dict:
    bounds = {"minimum": low, **({"maximum": high} if high is not None else {})}
    return {"type": "integer", **bounds, "x-message": f"a whole number from {low}" + (f" to {high}" if high else " up")}


def _number(low: float, inclusive: bool = False) -> dict:
    return {"type": "number", ("minimum" if inclusive else "exclusiveMinimum"): low,
            "x-message": f"a number {'≥' if inclusive else 'above'} {low:g}"}


def _section(properties: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "x-message": "a table"}


_LIMITS = {"window": _whole(1), "min_frames": _whole(1), "ng_rate_floor": _number(0, True),
           "ng_rate_factor": _number(0), "ng_rate_cap": _number(0), "stall_s": _number(0), "reconnects": _whole(1),
           "reconnect_window_s": _number(0), "backlog_s": _number(0), "disk_free_bytes": _whole(0),
           "disk_free_fraction": _number(0, True), "check_s": _number(0)}
LINE_SCHEMA = {
    "type": "object", "additionalProperties": False, "x-message": "a TOML document",
    "properties": {
        "bundle": {**_TEXT, "x-message": "the bundle folder (a path)"},
        "out": {**_TEXT, "x-message": "the run's output folder (a path)"},
        "sources": {
            "type": "array", "minItems": 1, "x-message": "a list of sources, [[sources]] tables",
            "items": {
                "type": "object", "additionalProperties": False, "required": ["source"], "x-message": "a table",
                "properties": {
                    "source": {"type": ["string", "integer"], "minLength": 1, "minimum": 0,
                               "x-message": "an image folder, video file, stream URL, GStreamer pipeline or camera "
                                            "index"},
                    "name": {**_TEXT, "x-message": "the source's name in every record (a non-empty string)"},
                    "username": _TEXT, "password": _SECRET,
                },
            },
        },
        "capture": _section({"mode": {"enum": ["auto", "latest", "every"], "x-message": "auto, latest or every"},
                             "batch": _whole(1, 1024), "watch": _FLAG, "loop": _FLAG, "max_frames": _whole(0)}),
        "inference": _section({"backend": _TEXT, "threads": _whole(1),
                               "precision": {"enum": ["auto", "fp32", "int8"], "x-message": "auto, fp32 or int8"}}),
        "outputs": _section({"save": {"enum": ["ng", "all", "none"], "x-message": "ng, all or none"}}),
        "disk": _section({"log_rotate": {**_TEXT, "x-message": "a size such as 100MB, or daily"},
                          "log_gzip": _FLAG, "max_disk": {**_TEXT, "x-message": "a size such as 2GB"},
                          "keep_days": _number(0)}),
        "view": _section({"port": _whole(0, 65535), "host": _TEXT, "clients": _whole(1), "token_file": _TEXT}),
        "collect": _section({"folder": _TEXT, "count": _whole(0), "every": _number(0, True)}),
        "mqtt": _section({"url": {**_TEXT, "x-message": "mqtt://HOST[:PORT]/TOPIC-PREFIX or mqtts://…"},
                          "username": _TEXT, "password": _SECRET, "ca": _TEXT, "cert": _TEXT, "key": _TEXT,
                          "queue": _whole(1), "heartbeat": _number(0)}),
        "modbus": _section({"address": {**_TEXT, "x-message": "HOST:PORT, e.g. 0.0.0.0:5020"},
                            "ng": {"enum": ["latched", "pulse"], "x-message": "latched or pulse"},
                            "pulse_ms": _whole(10, 60000)}),
        "opcua": _section({"endpoint": {**_TEXT, "x-message": "opc.tcp://HOST:PORT, e.g. opc.tcp://0.0.0.0:4840"},
                           "username": _TEXT, "password": _SECRET,
                           "pki": {**_TEXT, "x-message": "the folder of the server's certificates (a path)"}}),
        "alarms": _section(_LIMITS),
        "trust": {"type": "array", "minItems": 1, "items": _TEXT,
                  "x-message": "a list of public key files whose signature the bundle must carry"},
    },
}
_VALIDATOR = strict_validator(LINE_SCHEMA)

# inspect-run's option → where the file holds it
OPTION_KEYS = {
    "bundle_dir": ("bundle",), "out": ("out",), "save": ("outputs", "save"), "mode": ("capture", "mode"),
    "batch": ("capture", "batch"), "watch": ("capture", "watch"), "loop": ("capture", "loop"),
    "max_frames": ("capture", "max_frames"), "view": ("view", "port"), "view_host": ("view", "host"),
    "view_clients": ("view", "clients"), "view_token_file": ("view", "token_file"), "collect_good": ("collect", "folder"), "collect": ("collect", "count"),
    "collect_every": ("collect", "every"), "log_rotate": ("disk", "log_rotate"), "log_gzip": ("disk", "log_gzip"),
    "max_disk": ("disk", "max_disk"), "keep_days": ("disk", "keep_days"), "mqtt": ("mqtt", "url"),
    "mqtt_username": ("mqtt", "username"), "mqtt_password": ("mqtt", "password"), "mqtt_ca": ("mqtt", "ca"),
    "mqtt_cert": ("mqtt", "cert"), "mqtt_key": ("mqtt", "key"), "mqtt_queue": ("mqtt", "queue"),
    "mqtt_heartbeat": ("mqtt", "heartbeat"), "backend": ("inference", "backend"), "threads": ("inference", "threads"),
    "trust": ("trust",), "precision": ("inference", "precision"), "modbus": ("modbus", "address"),
    "modbus_ng": ("modbus", "ng"), "modbus_pulse_ms": ("modbus", "pulse_ms"), "opcua": ("opcua", "endpoint"),
    "opcua_username": ("opcua", "username"), "opcua_password": ("opcua", "password"), "opcua_pki": ("opcua", "pki"),
}
PATH_OPTIONS = {"bundle_dir", "out", "collect_good", "mqtt_ca", "mqtt_cert", "mqtt_key", "view_token_file",
                "opcua_pki"}


def read_line_config(path: Path) -> dict:
    """The file's record, checked against LINE_SCHEMA; one-line errors name the file and the key."""
    try:
        record = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InspectError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InspectError(f"--config {path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    except tomllib.TOMLDecodeError as error:
        raise InspectError(f"{path}: not valid TOML ({error})") from None
    check_record(record, LINE_SCHEMA, _VALIDATOR, path)
    return record


def resolve_secret(reference: dict, key: str, where: Path) -> str:
    """The value a secret reference points at (an environment variable, a file, a systemd credential)."""
    kind, name = next(iter(reference.items()))
    if kind == "env":
        if name not in os.environ:
            raise InspectError(f"{where}: {key} refers to the environment variable {name}, which is not set")
        return os.environ[name]
    if kind == "credential":
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise InspectError(f"{where}: {key} refers to the credential {name!r}, but $CREDENTIALS_DIRECTORY is "
                               "not set (systemd sets it for a unit with LoadCredential=)")
        file = Path(folder) / name
    else:
        file = where.parent / name
    try:
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise InspectError(f"{where}: {key}: cannot read {file} ({getattr(error, 'strerror', None) or error})") from None


def _lookup(record: dict, keys: tuple):
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def apply_line_config(options: dict, given: set[str], path: Path) -> tuple[dict, Limits]:
    """inspect-run's options with the file's values where no flag was given on the command line (`given`), the
    sources with their names and credentials, and the alarms' limits."""
    record = read_line_config(path)
    folder = Path(path).resolve().parent
    options = dict(options)
    for option, keys in OPTION_KEYS.items():
        value = _lookup(record, keys)
        if value is None or option in given:
            continue
        if option in PASSWORDS:
            value = resolve_secret(value, PASSWORDS[option][0], Path(path))
        elif option in PATH_OPTIONS:
            value = folder / value
        elif option == "trust":
            value = [folder / key for key in value]
        options[option] = value
    if "source" not in given and "camera" not in given and record.get("sources"):
        texts, names = [], []
        for index, entry in enumerate(record["sources"]):
            text = str(entry["source"])
            if entry.get("password") is not None and entry.get("username") is None:
                raise InspectError(f"{path}: sources[{index}].password needs sources[{index}].username")
            password = resolve_secret(entry["password"], f"sources[{index}].password", Path(path)) \
                if entry.get("password") else None
            local = folder / text
            texts.append(str(local) if "://" not in text and not text.isdigit() and local.exists() else
                         with_credentials(text, entry.get("username"), password))
            names.append(entry.get("name") or without_credentials(text)[0])
        options["source"], options["source_names"] = texts, names
    limits = Limits(**record.get("alarms", {}))
    return options, limits


def print_config(options: dict, defaults: dict) -> str:
    """inspect-run's options as a line config file: the values that differ from the defaults, passwords replaced by
    references to environment variables (named on stderr)."""
    import tomli_w

    record: dict = {}
    for option, keys in OPTION_KEYS.items():
        value = options.get(option)
        if value is None or (isinstance(value, (list, tuple)) and not value) or value == defaults.get(option):
            continue
        if option in PASSWORDS:
            key, variable = PASSWORDS[option]
            value = {"env": variable}
            warn(f"{key} is written as {{ env = \"{variable}\" }}: set it in the service's environment")
        section = record
        for key in keys[:-1]:
            section = section.setdefault(key, {})
        if option in PATH_OPTIONS:  # the file may be kept elsewhere than where these were relative to
            value = Path(value).resolve()
        elif option == "trust":
            value = [str(Path(key).resolve()) for key in value]
        section[keys[-1]] = str(value) if isinstance(value, Path) else getattr(value, "value", value)
    sources = []
    texts = list(options.get("source") or []) + ([str(options["camera"])] if options.get("camera") is not None else [])
    for index, text in enumerate(texts):
        url, username, password = without_credentials(text)
        if username is None and Path(text).exists():
            url = str(Path(text).resolve())
        entry = {"source": url}
        if username is not None:
            entry["username"] = username
        if password is not None:
            variable = f"EDGE_INSPECT_SOURCE_{index + 1}_PASSWORD"
            entry["password"] = {"env": variable}
            warn(f"the password of source {index + 1} is written as {{ env = \"{variable}\" }}: set it in the "
                 "service's environment")
        sources.append(entry)
    if sources:
        record["sources"] = sources
    return tomli_w.dumps(record)
