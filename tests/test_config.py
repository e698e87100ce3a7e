"""Configuration: every variable parsed, every error reported at once, naming the variable."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from agent.config import FIELDS, load_settings
from agent.errors import ConfigError
from agent.model import Resource
from tests.conftest import AGENT, base_env, run_agent

# One bad value per variable that validates its input.
BAD_VALUES = {
    "TELEMETRY_ENABLED": "maybe",
    "TELEMETRY_RESOURCE": "notebook",
    "TELEMETRY_ENDPOINT_NAME": "bad name!",
    "TELEMETRY_VARIANT_NAME": "-leading-hyphen",
    "TELEMETRY_CONTAINER_NAME": "x" * 64,
    "TELEMETRY_JOB_NAME": "job_with_underscore",
    "TELEMETRY_HOST": "host:with:colons",
    "TELEMETRY_NAMESPACE": "AWS/SageMaker",
    "TELEMETRY_INTERVAL": "45",
    "TELEMETRY_HIGH_RESOLUTION": "sometimes",
    "TELEMETRY_SAMPLE_INTERVAL": "0",
    "TELEMETRY_CLOUDWATCH": "maybe",
    "TELEMETRY_PROMETHEUS": "localhost",
    "TELEMETRY_FILE_SINK": "relative/calls.jsonl",
    "TELEMETRY_PROXY_LISTEN": "8080x",
    "TELEMETRY_PROXY_UPSTREAM": "host:99999",
    "TELEMETRY_HOOK_SOCKET": "relative/hooks.sock",
    "TELEMETRY_STATSD": "127.0.0.1:",
    "TELEMETRY_DISK_PATH": "opt/ml",
    "TELEMETRY_LOG_GROUP": "/bad group",
    "TELEMETRY_LOG_STREAM": "bad*stream",
    "TELEMETRY_LOG_START_PATTERN": "([unclosed",
    "TELEMETRY_SHUTDOWN_TIMEOUT": "-1",
    "TELEMETRY_STOP_GRACE": "soon",
    "TELEMETRY_INSTANCE_COUNT": "0",
    "TELEMETRY_MAX_MODELS": "0",
    "TELEMETRY_BUFFER_MB": "lots",
    "TELEMETRY_SPOOL_DIR": "spool",
    "TELEMETRY_SPOOL_MB": "0",
    "TELEMETRY_AWS_TIMEOUT": "0",
    "TELEMETRY_PROXY_TIMEOUT": "-1",
    "TELEMETRY_PROXY_CONNECT_TIMEOUT": "0",
    "TELEMETRY_PROXY_CLIENT_HEADER_TIMEOUT": "0",
    "TELEMETRY_PROXY_CLIENT_BODY_TIMEOUT": "0",
    "TELEMETRY_PROXY_SEND_TIMEOUT": "0",
    "TELEMETRY_PROXY_KEEPALIVE_TIMEOUT": "0",
    "TELEMETRY_PROXY_METRICS": "maybe",
    "TELEMETRY_LOG_RETENTION_DAYS": "10",
    "TELEMETRY_FAIL_OPEN": "perhaps",
    "TELEMETRY_LOG_LEVEL": "verbose",
    "TELEMETRY_CUSTOM_SERIES": "-1",
}


class TestDefaults:
    def test_defaults_match_design(self) -> None:
        """With no variables set, the documented defaults apply."""
        s = load_settings({"AWS_CONFIG_FILE": "/nonexistent"})
        assert s.enabled and s.resource is Resource.ENDPOINT
        assert s.variant_name == "AllTraffic" and s.namespace == "SageMakerAgent"
        assert s.interval == 60 and s.sample_interval == 1.0 and not s.high_resolution
        assert s.cloudwatch == "auto" and not s.cloudwatch_enabled
        assert str(s.prometheus) == "127.0.0.1:9464" and str(s.statsd) == "127.0.0.1:8125"
        assert s.shutdown_timeout == 20 and s.instance_count == 1
        assert s.buffer_mb == 64 and s.spool_mb == 1024 and s.log_level == "info"

    def test_auto_cloudwatch_follows_region(self) -> None:
        """`auto` is on exactly when a region is configured."""
        s = load_settings({"AWS_REGION": "eu-west-1", "TELEMETRY_ENDPOINT_NAME": "ep"})
        assert s.cloudwatch_enabled and s.region == "eu-west-1"
        off = load_settings({"AWS_REGION": "eu-west-1", "TELEMETRY_CLOUDWATCH": "off"})
        assert not off.cloudwatch_enabled

    def test_training_job_name_fallback(self) -> None:
        """TRAINING_JOB_NAME names the job when TELEMETRY_JOB_NAME is unset."""
        s = load_settings({"TRAINING_JOB_NAME": "job-1", "TELEMETRY_RESOURCE": "training",
                           "AWS_CONFIG_FILE": "/nonexistent"})
        assert s.job_name == "job-1"


class TestErrors:
    def test_table_covers_every_field(self) -> None:
        """Every configuration key has a bad-value case here."""
        assert {f.env for f in FIELDS} == set(BAD_VALUES)

    def test_every_bad_variable_reported_in_one_error(self) -> None:
        """All invalid variables are reported together, each with its name and value."""
        with pytest.raises(ConfigError) as info:
            load_settings({**BAD_VALUES, "AWS_CONFIG_FILE": "/nonexistent"})
        message = str(info.value)
        for name, value in BAD_VALUES.items():
            if value.strip():
                assert f"{name}={value!r}" in message, name
        # Blank values fall back to the default, except where there is none to validate.
        assert len(info.value.problems) >= len([v for v in BAD_VALUES.values() if v.strip()])
        assert all("accepted" in p for p in info.value.problems)

    @pytest.mark.parametrize(("name", "value"), sorted(BAD_VALUES.items()))
    def test_each_bad_value_names_its_variable(self, name: str, value: str) -> None:
        """Each bad value alone is rejected with a message naming the variable."""
        if not value.strip():
            pytest.skip("blank means unset for optional keys")
        env = {name: value, "AWS_CONFIG_FILE": "/nonexistent"}
        with pytest.raises(ConfigError, match=name):
            load_settings(env)

    def test_endpoint_name_required_when_sending(self) -> None:
        """Sending to CloudWatch for an endpoint needs its name."""
        with pytest.raises(ConfigError, match="TELEMETRY_ENDPOINT_NAME is missing"):
            load_settings({"TELEMETRY_CLOUDWATCH": "on"})

    def test_upstream_required_with_proxy(self) -> None:
        """A proxy without an upstream is a configuration error."""
        with pytest.raises(ConfigError, match="TELEMETRY_PROXY_UPSTREAM"):
            load_settings({"TELEMETRY_PROXY_LISTEN": "auto", "AWS_CONFIG_FILE": "/nonexistent"})


class TestToml:
    def test_file_values_apply_and_env_wins(self, tmp_path: Path) -> None:
        """TOML keys set values; the environment overrides them."""
        path = tmp_path / "t.toml"
        path.write_text('interval = 10\nnamespace = "FromFile"\nhigh_resolution = true\n')
        s = load_settings({"TELEMETRY_CONFIG": str(path), "TELEMETRY_NAMESPACE": "FromEnv",
                           "AWS_CONFIG_FILE": "/nonexistent"})
        assert s.interval == 10 and s.high_resolution and s.namespace == "FromEnv"

    def test_unknown_key_and_bad_value_reported(self, tmp_path: Path) -> None:
        """A typo'd key and a bad value in the file are both reported."""
        path = tmp_path / "t.toml"
        path.write_text('intervall = 10\ninterval = 7\n')
        with pytest.raises(ConfigError) as info:
            load_settings({"TELEMETRY_CONFIG": str(path), "AWS_CONFIG_FILE": "/nonexistent"})
        assert "unknown key 'intervall'" in str(info.value)
        assert f"interval in {path}='7'" in str(info.value)

    def test_example_file_lists_every_key_with_its_default(self) -> None:
        """config/telemetry.toml documents every key and parses to the defaults."""
        example = Path(__file__).parent.parent / "config" / "telemetry.toml"
        text = example.read_text()
        for field in FIELDS:
            assert f"{field.name} =" in text, field.name
        uncommented = "\n".join(line.lstrip("# ") for line in text.splitlines()
                                if line.startswith("# ") and " = " in line)
        path = Path("/tmp") / "uncommented-example.toml"
        path.write_text(uncommented)
        assert load_settings({"TELEMETRY_CONFIG": str(path), "AWS_CONFIG_FILE": "/nonexistent"})


class TestCli:
    def test_check_config_prints_settings_without_credentials(self, tmp_path: Path) -> None:
        """check-config shows the effective settings and names, never a secret."""
        env = base_env(tmp_path, TELEMETRY_CONTAINER_NAME="c1", AWS_SESSION_TOKEN="tok-secret-123")
        done = subprocess.run([*AGENT, "check-config"], env=env, capture_output=True, check=False)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["names"]["log_group"] == "/aws/sagemaker/Endpoints/my-endpoint"
        assert report["names"]["log_stream"] == "AllTraffic/i-0123456789abcdef0/c1"
        for secret in (env["AWS_SECRET_ACCESS_KEY"], "tok-secret-123", env["AWS_ACCESS_KEY_ID"]):
            assert secret.encode() not in done.stdout + done.stderr

    def test_check_config_exit_2_on_errors(self, tmp_path: Path) -> None:
        """check-config exits 2 and lists the problems."""
        env = base_env(tmp_path, TELEMETRY_INTERVAL="7", TELEMETRY_LOG_LEVEL="loud")
        done = subprocess.run([*AGENT, "check-config"], env=env, capture_output=True, check=False)
        assert done.returncode == 2
        assert b"TELEMETRY_INTERVAL" in done.stderr and b"TELEMETRY_LOG_LEVEL" in done.stderr

    def test_run_refuses_bad_config_before_child_starts(self, tmp_path: Path) -> None:
        """A bad configuration exits 2 and the child never runs."""
        marker = tmp_path / "ran"
        env = base_env(tmp_path, TELEMETRY_INTERVAL="7")
        done = run_agent(["touch", str(marker)], env)
        assert done.returncode == 2 and not marker.exists()
        assert b"TELEMETRY_INTERVAL='7' is invalid" in done.stderr

    def test_fail_open_runs_child_anyway(self, tmp_path: Path) -> None:
        """TELEMETRY_FAIL_OPEN=true runs the child without telemetry and logs why."""
        env = base_env(tmp_path, TELEMETRY_INTERVAL="7", TELEMETRY_FAIL_OPEN="true")
        done = run_agent(["sh", "-c", "echo child-ran; exit 3"], env)
        assert done.returncode == 3 and done.stdout == b"child-ran\n"
        assert b"config_invalid_running_without_telemetry" in done.stderr
        assert not (tmp_path / "calls.jsonl").exists()

    def test_version_and_help(self) -> None:
        """--version and --help work."""
        version = subprocess.run([*AGENT, "--version"], capture_output=True, check=True)
        assert b"telemetry-agent 0.1.0" in version.stdout
        helptext = subprocess.run([*AGENT, "--help"], capture_output=True, check=True)
        assert b"check-config" in helptext.stdout


class TestFuzz:
    """Any value for any variable: a Settings or a ConfigError naming it, never a crash."""

    @staticmethod
    def _check(name: str, value: str) -> None:
        from agent.errors import ConfigError as Error

        env = {name: value, "AWS_CONFIG_FILE": "/nonexistent"}
        try:
            load_settings(env)
        except Error as exc:
            assert name in str(exc) or "TELEMETRY_" in str(exc)

    def test_every_variable_with_arbitrary_text(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=25, deadline=None)
        @given(st.text(max_size=40).filter(lambda v: "\x00" not in v))
        def one(value: str) -> None:
            for field in FIELDS:
                self._check(field.env, value)

        one()


class TestUnknownVariables:
    """A misspelt TELEMETRY_* variable is an error, not a silently ignored setting."""

    def test_typo_named_with_the_closest_known_name(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_settings({"TELEMETRY_INTERVALL": "7", "AWS_CONFIG_FILE": "/nonexistent"})
        (problem,) = info.value.problems
        assert problem.startswith("TELEMETRY_INTERVALL is not a known variable; "
                                  "did you mean TELEMETRY_INTERVAL?")

    def test_reported_with_every_other_error(self) -> None:
        """Unknown names and bad values come in one ConfigError."""
        env = {"TELEMETRY_LOGLEVEL": "debug", "TELEMETRY_SOMETHING_ELSE": "1",
               "TELEMETRY_INTERVAL": "7", "AWS_CONFIG_FILE": "/nonexistent"}
        with pytest.raises(ConfigError) as info:
            load_settings(env)
        message = str(info.value)
        assert len(info.value.problems) == 3
        assert "did you mean TELEMETRY_LOG_LEVEL?" in message
        assert "TELEMETRY_SOMETHING_ELSE is not a known variable; no setting has a similar name" in message
        assert "TELEMETRY_INTERVAL='7' is invalid" in message

    def test_every_name_the_project_uses_is_known(self, tmp_path: Path) -> None:
        """Names the agent sets for its child (TELEMETRY_HOOK_SOCKET) or reads besides the
        settings (TELEMETRY_CONFIG), and every name the code and examples mention, are known:
        a nested agent or the documented set-up never trips the check."""
        root = Path(__file__).parent.parent
        config = tmp_path / "t.toml"
        config.write_text("")
        assert load_settings({"TELEMETRY_HOOK_SOCKET": "/tmp/x/hooks.sock",
                              "TELEMETRY_CONFIG": str(config), "AWS_CONFIG_FILE": "/nonexistent"})
        known = {f.env for f in FIELDS} | {"TELEMETRY_CONFIG"}
        sources = [*root.glob("agent/**/*.py"), *root.glob("examples/**/*"), *root.glob("bench/*.py"),
                   root / "Dockerfile"]
        used = set()
        for path in sources:
            if path.is_file() and path.suffix not in (".pyc", ".so"):
                text = path.read_text(errors="replace")
                used |= {m for m in re.findall(r"TELEMETRY_[A-Z0-9_]+", text) if not m.endswith("_")}
        assert used and used <= known, sorted(used - known)

    def test_cli_refuses_and_fail_open_runs(self, tmp_path: Path) -> None:
        """`run` exits 2 naming the typo; with TELEMETRY_FAIL_OPEN=true the child runs anyway."""
        marker = tmp_path / "ran"
        env = base_env(tmp_path, TELEMETRY_INTERVALL="7")
        done = run_agent(["touch", str(marker)], env)
        assert done.returncode == 2 and not marker.exists()
        assert b"did you mean TELEMETRY_INTERVAL?" in done.stderr
        env["TELEMETRY_FAIL_OPEN"] = "true"
        done = run_agent(["sh", "-c", "echo child-ran; exit 3"], env)
        assert done.returncode == 3 and done.stdout == b"child-ran\n"
        assert b"config_invalid_running_without_telemetry" in done.stderr
        assert b"TELEMETRY_INTERVALL" in done.stderr

