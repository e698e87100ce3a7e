"""Command line: `telemetry-agent run [--] CMD...`, `check-config`, `dashboard`, `--version`.

Maps outcomes to exit codes: the child's code for `run` (127: not found, 126: not
executable), 2 for a configuration error (before the child starts, unless
`TELEMETRY_FAIL_OPEN=true`). stdout carries only a command's output: the child's
stdout, `check-config`'s JSON report, `dashboard`'s JSON body. Every agent line,
configuration errors included, is a JSON log line on stderr (`agent.log`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from agent import __version__
from agent.config import ConfigError, Settings, load_settings, parse_bool
from agent.log import configure_logging, get_logger
from agent.model import Identity
from agent.rules import naming
from agent.stdio import STDERR
from agent.supervisor import hold_signals, release_signals, spawn_exit_code

EXIT_CONFIG = 2
# At exit, how long agent log lines may take to reach a slow reader of stderr.
STDERR_FLUSH_S = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telemetry-agent",
        description="Supervise a model server and ship SageMaker-style metrics and logs.",
        epilog="Configuration comes from TELEMETRY_* environment variables; see the README.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run CMD under the agent (or the agent alone)",
                              description="Run CMD as a supervised child. Put -- before CMD "
                              "when it has options of its own.")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the model server command")
    commands.add_parser("check-config", help="validate the configuration and print it")
    commands.add_parser("dashboard", help="print a CloudWatch dashboard body for the metrics "
                        "this configuration publishes",
                        description="Print JSON for `aws cloudwatch put-dashboard "
                        "--dashboard-body file://...`, from the same TELEMETRY_* settings.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("info")  # until the settings say otherwise: stderr, JSON, never stdout
    try:
        if args.command == "check-config":
            return check_config(os.environ)
        if args.command == "dashboard":
            return print_dashboard(os.environ)
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        return run(cmd, os.environ)
    except KeyboardInterrupt:  # Ctrl-C before `run` without CMD set its handlers: no traceback
        return 130
    finally:
        STDERR.flush(STDERR_FLUSH_S)


def check_config(env: Mapping[str, str]) -> int:
    """Print the effective settings and the names they give; 0 if valid, 2 if not."""
    loaded = _load(env)
    if isinstance(loaded, ConfigError):
        print(json.dumps({"problems": loaded.problems}, indent=2))
        return EXIT_CONFIG
    settings, identity = loaded
    report = {
        "settings": settings.describe(),
        "names": {
            "log_group": naming.log_group(identity, settings.log_group),
            "log_stream": naming.log_stream(identity, settings.log_stream),
            "invocation_namespace": naming.invocation_namespace(settings.namespace),
            "instance_namespace": naming.instance_namespace(settings.namespace, settings.resource),
            "host_dimension": naming.host_dimension(identity),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def print_dashboard(env: Mapping[str, str]) -> int:
    """Print the dashboard body for this configuration; 2 on a configuration error."""
    from agent.rules.dashboard import dashboard  # noqa: PLC0415

    loaded = _load(env)
    if isinstance(loaded, ConfigError):
        return EXIT_CONFIG
    settings, identity = loaded
    print(json.dumps(dashboard(identity, settings.namespace, settings.region or "us-east-1"),
                     indent=2, ensure_ascii=False))
    return 0


def _load(env: Mapping[str, str]) -> tuple[Settings, Identity] | ConfigError:
    """Settings and identity for the one-shot commands; the error (logged) if invalid."""
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        _config_invalid(exc)
        return exc
    from agent.identity import resolve_identity  # noqa: PLC0415

    return settings, resolve_identity(settings, env)


def run(cmd: list[str], env: Mapping[str, str]) -> int:
    """`telemetry-agent run`: validate, then supervise `cmd` (or run alone)."""
    if cmd:
        hold_signals()  # a stop signal from here on waits for the child (supervisor.py)
    if not _enabled(env):
        return _exec_plain(cmd)
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        if not _fail_open(env):
            _config_invalid(exc)
            return EXIT_CONFIG
        get_logger("cli").error("config_invalid_running_without_telemetry", problems=exc.problems)
        STDERR.flush(STDERR_FLUSH_S)
        return _exec_plain(cmd)
    configure_logging(settings.log_level)
    code = _supervise(settings, cmd, env)
    from agent.app import hard_exit  # noqa: PLC0415

    sys.stdout.flush()
    sys.stderr.flush()
    STDERR.flush(STDERR_FLUSH_S)
    hard_exit(code)
    return code  # not reached


def _config_invalid(exc: ConfigError) -> None:
    """Report every configuration problem in one agent log line."""
    get_logger("cli").error("config_invalid", problems=exc.problems,
                            hint="fix them all, or set TELEMETRY_FAIL_OPEN=true to run "
                            "the child without telemetry")


def _supervise(settings: Settings, cmd: list[str], env: Mapping[str, str]) -> int:
    from agent import app  # noqa: PLC0415 - keeps `--help` and `check-config` light
    from agent.identity import resolve_identity  # noqa: PLC0415

    identity = resolve_identity(settings, env)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(app.run(settings, identity, cmd, env))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (libuv: about half the CPU per proxied request), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop


def _enabled(env: Mapping[str, str]) -> bool:
    try:
        return parse_bool(env.get("TELEMETRY_ENABLED", "true"))
    except ValueError:
        return True  # reported by load_settings with the other problems


def _fail_open(env: Mapping[str, str]) -> bool:
    try:
        return parse_bool(env.get("TELEMETRY_FAIL_OPEN", "false"))
    except ValueError:
        return False


def _exec_plain(cmd: list[str]) -> int:
    """Become the child: telemetry off means no agent at all in the way."""
    if not cmd:
        return 0
    release_signals()  # the mask would outlive exec; a pending stop signal acts now
    try:
        os.execvp(cmd[0], cmd)  # noqa: S606 - running the user's command is the job
    except OSError as exc:
        code = spawn_exit_code(exc)
        get_logger("cli").error("child_not_found" if code == 127 else "child_not_executable",
                                argv=cmd, error=exc.strerror)
        return code
    return 0  # not reached
