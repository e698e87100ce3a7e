"""Who this container is: endpoint/job names from settings, the host from the platform.

Host discovery, first match wins:
1. `TELEMETRY_HOST`;
2. training and processing: `current_host` from SageMaker's `resourceconfig.json`;
3. endpoint and transform: the EC2 instance id through IMDSv2 (short timeouts,
   one try), never when `AWS_EC2_METADATA_DISABLED=true`;
4. the hostname.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from agent.config import Settings
from agent.log import get_logger
from agent.model import Identity, Resource

RESOURCE_CONFIG = {
    Resource.TRAINING: Path("/opt/ml/input/config/resourceconfig.json"),
    Resource.PROCESSING: Path("/opt/ml/config/resourceconfig.json"),
}
IMDS_URL = "http://169.254.169.254/latest"
IMDS_TIMEOUT_S = 0.3
# Used for names when no endpoint/job name is configured (dry runs, local tests).
UNNAMED = "local"

_log = get_logger("identity")


def current_host(path: Path) -> str | None:
    """`current_host` from a SageMaker resourceconfig.json, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    host = data.get("current_host") if isinstance(data, dict) else None
    return host if isinstance(host, str) and host else None


def imds_allowed(env: Mapping[str, str]) -> bool:
    """Whether the instance-metadata service may be asked at all."""
    return env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() != "true"


def imds_url(env: Mapping[str, str]) -> str:
    """The metadata service's base URL: `AWS_EC2_METADATA_SERVICE_ENDPOINT` as botocore
    reads it, so the agent and boto3 always ask the same address."""
    endpoint = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip().rstrip("/")
    return f"{endpoint}/latest" if endpoint else IMDS_URL


def instance_id(timeout: float = IMDS_TIMEOUT_S, base: str = IMDS_URL) -> str | None:
    """The EC2 instance id via IMDSv2 (token, then GET), or None on any failure."""
    try:
        token_req = urllib.request.Request(  # noqa: S310 - fixed link-local URL
            f"{base}/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(token_req, timeout=timeout) as answer:  # noqa: S310
            token = answer.read().decode()
        id_req = urllib.request.Request(  # noqa: S310
            f"{base}/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(id_req, timeout=timeout) as answer:  # noqa: S310
            value = answer.read().decode().strip()
    except (OSError, ValueError):
        return None
    return value or None


def discover_host(settings: Settings, env: Mapping[str, str]) -> str:
    """The host name used in `Host` dimensions and stream names."""
    if settings.host:
        return settings.host
    config_path = RESOURCE_CONFIG.get(settings.resource)
    if config_path is not None:
        found = current_host(config_path)
        if found:
            return found
    if settings.resource in (Resource.ENDPOINT, Resource.TRANSFORM) and imds_allowed(env):
        found = instance_id(base=imds_url(env))
        if found:
            return found
        _log.info("instance_id_unavailable", fallback="hostname")
    return socket.gethostname()


def resolve_identity(settings: Settings, env: Mapping[str, str], now: float | None = None) -> Identity:
    """Build the `Identity` the naming rules need."""
    return Identity(
        resource=settings.resource,
        endpoint_name=settings.endpoint_name or UNNAMED,
        variant_name=settings.variant_name,
        container_name=settings.container_name,
        job_name=settings.job_name or UNNAMED,
        host=discover_host(settings, env),
        start_epoch=int(time.time() if now is None else now),
    )
