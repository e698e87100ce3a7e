"""A CloudWatch dashboard for what the agent publishes (`telemetry-agent dashboard`).

Pure: identity and names in, the dashboard body out, ready for
`aws cloudwatch put-dashboard --dashboard-name NAME --dashboard-body file://body.json`.
Widgets: invocations and error rates, latency percentiles (the distributions make
p50/p90/p99 exact), and the instance metrics of this host.
"""

from __future__ import annotations

from typing import Any

from agent.model import Identity, Resource
from agent.rules import naming


def dashboard(identity: Identity, root_namespace: str, region: str) -> dict[str, Any]:
    """The dashboard body as a dict (json.dumps it)."""
    widgets: list[dict[str, Any]] = []
    if identity.resource is Resource.ENDPOINT:
        ns = naming.invocation_namespace(root_namespace)
        variant = ["EndpointName", identity.endpoint_name, "VariantName", identity.variant_name]
        widgets.append(_widget("Invocations and errors", region, [
            [ns, "Invocations", *variant, {"stat": "Sum"}],
            [ns, "Invocation4XXErrors", *variant, {"stat": "Sum"}],
            [ns, "Invocation5XXErrors", *variant, {"stat": "Sum"}],
        ]))
        widgets.append(_widget("Error rate (%)", region, [
            [{"expression": "100 * e4", "label": "4XX %", "id": "r4"}],
            [{"expression": "100 * e5", "label": "5XX %", "id": "r5"}],
            [ns, "Invocation4XXErrors", *variant, {"stat": "Average", "id": "e4", "visible": False}],
            [ns, "Invocation5XXErrors", *variant, {"stat": "Average", "id": "e5", "visible": False}],
        ]))
        widgets.append(_widget("ModelLatency (µs)", region, [
            [ns, "ModelLatency", *variant, {"stat": stat}] for stat in ("p50", "p90", "p99")]))
        container = naming.container_dimensions(identity)
        if container is not None:
            dims = [x for pair in container for x in pair]
            widgets.append(_widget("Container and overhead latency (µs)", region, [
                [ns, metric, *dims, {"stat": stat}]
                for metric in ("ContainerLatency", "OverheadLatency") for stat in ("p50", "p99")]))
    instance_ns = naming.instance_namespace(root_namespace, identity.resource)
    host = ["Host", naming.host_dimension(identity)]
    widgets.append(_widget("CPU, memory, disk (%)", region, [
        [instance_ns, metric, *host, {"stat": "Average"}]
        for metric in ("CPUUtilization", "MemoryUtilization", "DiskUtilization")]))
    widgets.append(_widget("GPU (%)", region, [
        [instance_ns, metric, *host, {"stat": "Average"}]
        for metric in ("GPUUtilization", "GPUMemoryUtilization")]))
    for index, widget in enumerate(widgets):
        widget["x"], widget["y"] = (index % 2) * 12, (index // 2) * 6
    return {"widgets": widgets}


def _widget(title: str, region: str, metrics: list[list[Any]]) -> dict[str, Any]:
    return {"type": "metric", "width": 12, "height": 6,
            "properties": {"title": title, "region": region, "view": "timeSeries",
                           "stacked": False, "period": 60, "metrics": metrics}}
