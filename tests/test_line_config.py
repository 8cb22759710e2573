"""inspect-run --config: a line config file runs the same line as the equivalent flags, flags override it, a bad
key or value is one line naming it, secrets come only by reference, and --print-config writes the flags as such a
file; plus the newcomer's findings on the commands' help and a missing camera."""

import json
import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app

runner = CliRunner()
# what differs between two runs of the same frames (seq: sources' frames interleave as their threads deliver them)
VARYING = ("time", "run", "seq", "latency_ms", "overlay")


def run_line(args) -> str:
    result = runner.invoke(run_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def records(out) -> list[dict]:
    """The run's records by source and frame, without what differs from run to run."""
    lines = [json.loads(line) for line in (out / "inspections.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in line.items() if k not in VARYING} for line in lines),
                  key=lambda line: (line["source"], line["frame"]))


def write_config(path, text: str):
    path.write_text(text)
    return path


def test_a_config_file_runs_the_same_line_as_the_flags(patchcore_bundle, mvtec_like, tmp_path):
    """The same bundle, sources, mode, batch and saving, once as flags and once as a file (the output folder
    relative to the file's): the same records, frame by frame, and the same overlays."""
    pasted, good = mvtec_like / "test" / "pasted", mvtec_like / "test" / "good"
    run_line([patchcore_bundle, "--source", pasted, "--source", good, "--save", "all", "--batch", 3,
              "--mode", "every", "--out", tmp_path / "flags"])
    (tmp_path / "line").mkdir()
    config = write_config(tmp_path / "line" / "line.toml", f"""
bundle = "{patchcore_bundle}"
out = "out"

[[sources]]
source = "{pasted}"

[[sources]]
source = "{good}"

[capture]
mode = "every"
batch = 3

[outputs]
save = "all"
""")
    run_line(["--config", config])
    assert records(tmp_path / "line" / "out") == records(tmp_path / "flags") and len(records(tmp_path / "flags")) == 12
    overlays = {p.name.split("_", 1)[1] for p in (tmp_path / "flags" / "overlays").rglob("*.jpg")}
    assert overlays == {p.name.split("_", 1)[1] for p in (tmp_path / "line" / "out" / "overlays").rglob("*.jpg")}


def test_flags_override_the_file_and_sources_have_their_names(patchcore_bundle, mvtec_like, tmp_path):
    config = write_config(tmp_path / "line.toml", f"""
bundle = "{patchcore_bundle}"
out = "{tmp_path / 'from-file'}"

[[sources]]
source = "{mvtec_like / 'test' / 'pasted'}"
name = "left camera"

[outputs]
save = "none"
""")
    run_line(["--config", config, "--save", "ng", "--out", tmp_path / "from-flag", "--max-frames", 3])
    lines = records(tmp_path / "from-flag")
    assert len(lines) == 3 and {line["source"] for line in lines} == {"left camera"}
    assert list((tmp_path / "from-flag" / "overlays").rglob("*.jpg")) and not (tmp_path / "from-file").exists()


@pytest.mark.parametrize("text, message", [
    ('[capture]\nbach = 2\n', "line.toml: unknown key capture.bach (known there: batch, loop, max_frames, mode, watch)"),
    ('[capture]\nbatch = 0\n', "line.toml: capture.batch must be a whole number from 1 to 1024, got 0"),
    ('[view]\nport = 70000\n', "line.toml: view.port must be a whole number from 0 to 65535, got 70000"),
    ('[disk]\nkeep_days = nan\n', "line.toml: disk.keep_days must be a finite number, got nan"),
    ('[mqtt]\nurl = "mqtt://b/p"\nusername = "u"\npassword = "hunter2"\n',
     'line.toml: mqtt.password must be a reference, { env = "NAME" }, { file = "PATH" } or { credential = "NAME" }'),
    ('[mqtt]\nurl = "mqtt://b/p"\nusername = "u"\npassword = { env = "EDGE_INSPECT_TEST_UNSET" }\n',
     "line.toml: mqtt.password refers to the environment variable EDGE_INSPECT_TEST_UNSET, which is not set"),
    ('[opcua]\nendpoint = "opc.tcp://0.0.0.0:4840"\nusername = "plc"\npassword = "hunter2"\n',
     'line.toml: opcua.password must be a reference, { env = "NAME" }, { file = "PATH" } or { credential = "NAME" }'),
    ('[[sources]]\nsource = "rtsp://cam/1"\npassword = { env = "X" }\n',
     "line.toml: sources[0].password needs sources[0].username"),
    ('[alarms]\nstall_s = -1\n', "line.toml: alarms.stall_s must be a number above 0, got -1"),
    ('capture = [\n', "line.toml: not valid TOML"),
])
def test_a_bad_key_or_value_is_one_line_naming_it(patchcore_bundle, tmp_path, text, message):
    config = write_config(tmp_path / "line.toml", f'bundle = "{patchcore_bundle}"\n{text}')
    result = runner.invoke(run_app, ["--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert message in result.output, result.output
    assert "hunter2" not in result.output


def test_secrets_come_from_the_environment_a_file_or_a_systemd_credential(tmp_path, monkeypatch):
    from edgeinspect.runtime.commands.line_config import resolve_secret

    where = tmp_path / "line.toml"
    (tmp_path / "broker.secret").write_text("from a file\n")
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "broker").write_text("from systemd")
    monkeypatch.setenv("BROKER_PASSWORD", "from the environment")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    assert resolve_secret({"env": "BROKER_PASSWORD"}, "mqtt.password", where) == "from the environment"
    assert resolve_secret({"file": "broker.secret"}, "mqtt.password", where) == "from a file"
    assert resolve_secret({"credential": "broker"}, "mqtt.password", where) == "from systemd"


def test_print_config_writes_the_flags_as_a_file_without_their_passwords(patchcore_bundle, mvtec_like, tmp_path,
                                                                         monkeypatch):
    """Today's flags → --print-config → a file that runs the same line; the camera's and the broker's passwords
    (and the OPC UA one) are written as references to environment variables, never as themselves."""
    pasted = mvtec_like / "test" / "pasted"
    args = [patchcore_bundle, "--source", pasted, "--source", "rtsp://admin:s3cret@cam1:554/live", "--save", "all",
            "--batch", 2, "--mqtt", "mqtt://broker/line1", "--mqtt-username", "line", "--mqtt-password", "hunter2",
            "--opcua", "opc.tcp://0.0.0.0:4840", "--opcua-username", "plc", "--opcua-password", "opc-pw-7"]
    result = subprocess.run([sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()",
                             *map(str, args), "--print-config"], capture_output=True, text=True, check=True)
    assert not [word for word in ("s3cret", "hunter2", "opc-pw-7") if word in result.stdout + result.stderr]
    record = tomllib.loads(result.stdout)
    assert record["sources"][1] == {"source": "rtsp://cam1:554/live", "username": "admin",
                                    "password": {"env": "EDGE_INSPECT_SOURCE_2_PASSWORD"}}
    assert record["mqtt"]["password"] == {"env": "EDGE_INSPECT_MQTT_PASSWORD"}
    assert record["opcua"] == {"endpoint": "opc.tcp://0.0.0.0:4840", "username": "plc",
                               "password": {"env": "EDGE_INSPECT_OPCUA_PASSWORD"}}
    assert record["capture"] == {"batch": 2} and record["outputs"] == {"save": "all"}
    assert "EDGE_INSPECT_SOURCE_2_PASSWORD" in result.stderr

    del record["sources"][1], record["mqtt"], record["opcua"]  # no camera nor broker here: the folder alone, as the flags would
    import tomli_w
    config = write_config(tmp_path / "line.toml", tomli_w.dumps(record))
    run_line(["--config", config, "--out", tmp_path / "from-file"])
    run_line([patchcore_bundle, "--source", pasted, "--save", "all", "--batch", 2, "--out", tmp_path / "from-flags"])
    assert records(tmp_path / "from-file") == records(tmp_path / "from-flags")


def test_no_command_shows_a_flag_as_taking_a_value():
    """Typer's rich help showed every flag of click 8.5 as `--watch <bool>` (and `--watch true` then failed)."""
    from edgeinspect.calibration.cli import calibrate_app, eval_app
    from edgeinspect.export.cli import app as export_app
    from edgeinspect.runtime.commands.bench import app as bench_app
    from edgeinspect.train.cli import app as train_app

    for app, args in [(run_app, []), (bench_app, []), (export_app, []), (calibrate_app, []), (eval_app, []),
                      (train_app, ["patchcore"])]:
        result = runner.invoke(app, [*args, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "--help" in result.output
        assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output
    assert "--watch  " in runner.invoke(run_app, ["--help"], terminal_width=200).output


def test_a_missing_camera_is_one_line_without_opencvs_own_warnings(patchcore_bundle, tmp_path):
    result = subprocess.run([sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()",
                             str(patchcore_bundle), "--camera", "99", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: --camera 99: could not be opened (not connected, busy, or not a video OpenCV " \
                            "can read)\n", result.stderr
