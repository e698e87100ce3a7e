"""SageMaker's names: log groups, log streams, namespaces and dimension sets.

Mirrors docs/metrics.md (SageMaker's "Log groups and streams" table and the
`/aws/sagemaker/*` instance-metric namespaces), with the root namespace
configurable because `AWS/` namespaces are reserved.
"""

from __future__ import annotations

from agent.model import Dimensions, Identity, Resource

_LOG_GROUPS = {
    Resource.ENDPOINT: "/aws/sagemaker/Endpoints/{endpoint}",
    Resource.TRAINING: "/aws/sagemaker/TrainingJobs",
    Resource.TRANSFORM: "/aws/sagemaker/TransformJobs",
    Resource.PROCESSING: "/aws/sagemaker/ProcessingJobs",
}
_LOG_STREAMS = {
    Resource.ENDPOINT: "{variant}/{host}",
    Resource.TRAINING: "{job}/{host}-{epoch}",
    Resource.TRANSFORM: "{job}/{host}-{epoch}",
    Resource.PROCESSING: "{job}/{host}-{epoch}",
}
_INSTANCE_NAMESPACES = {
    Resource.ENDPOINT: "Endpoints",
    Resource.TRAINING: "TrainingJobs",
    Resource.TRANSFORM: "TransformJobs",
    Resource.PROCESSING: "ProcessingJobs",
}
# Log stream names may not contain ':' or '*' (CloudWatch Logs API).
_STREAM_FORBIDDEN = str.maketrans({":": "_", "*": "_"})


def placeholders(identity: Identity) -> dict[str, str]:
    """Values for `{endpoint}`-style placeholders in names and overrides."""
    return {
        "endpoint": identity.endpoint_name,
        "variant": identity.variant_name,
        "container": identity.container_name or "",
        "job": identity.job_name,
        "host": identity.host,
        "epoch": str(identity.start_epoch),
    }


def render(template: str, identity: Identity) -> str:
    """Fill `{name}` placeholders; unknown ones are left as written."""
    out = template
    for key, value in placeholders(identity).items():
        out = out.replace("{" + key + "}", value)
    return out


def log_group(identity: Identity, override: str | None = None) -> str:
    """The CloudWatch log group SageMaker uses for this resource."""
    return render(override or _LOG_GROUPS[identity.resource], identity)


def log_stream(identity: Identity, override: str | None = None) -> str:
    """The log stream: `<variant>/<host>[/<container>]`, `<job>/<host>-<epoch>[/<container>]`...

    Training and processing streams never carry a container suffix; endpoint
    and transform streams do when a pipeline container name is set.
    """
    if override:
        name = render(override, identity)
    else:
        name = render(_LOG_STREAMS[identity.resource], identity)
        if identity.container_name and identity.resource in (Resource.ENDPOINT, Resource.TRANSFORM):
            name += "/" + identity.container_name
    return name.translate(_STREAM_FORBIDDEN)


def invocation_namespace(root: str) -> str:
    """Namespace of the invocation metrics (mirrors `AWS/SageMaker`)."""
    return root


def instance_namespace(root: str, resource: Resource) -> str:
    """Namespace of the instance metrics (mirrors `/aws/sagemaker/<Kind>`)."""
    return f"{root}/{_INSTANCE_NAMESPACES[resource]}"


def host_dimension(identity: Identity) -> str:
    """The `Host` dimension: `<endpoint>/<variant>/<host>` or `<job>/<host>`."""
    if identity.resource is Resource.ENDPOINT:
        return f"{identity.endpoint_name}/{identity.variant_name}/{identity.host}"
    return f"{identity.job_name}/{identity.host}"


def variant_dimensions(identity: Identity) -> Dimensions:
    """`[EndpointName, VariantName]`."""
    return (("EndpointName", identity.endpoint_name), ("VariantName", identity.variant_name))


def container_dimensions(identity: Identity) -> Dimensions | None:
    """`[EndpointName, VariantName, ContainerName]`, or None without a container name."""
    if not identity.container_name or identity.resource is not Resource.ENDPOINT:
        return None
    return (*variant_dimensions(identity), ("ContainerName", identity.container_name))


def instance_dimension_sets(identity: Identity) -> list[Dimensions]:
    """Dimension sets for instance metrics: `[Host]`, plus the container view when named."""
    sets: list[Dimensions] = [(("Host", host_dimension(identity)),)]
    container = container_dimensions(identity)
    if container is not None:
        sets.append(container)
    return sets


def invocation_dimension_sets(identity: Identity, metric: str) -> list[Dimensions]:
    """Dimension sets for an invocation metric.

    All invocation metrics go under `[EndpointName, VariantName]` except
    ContainerLatency, which exists only per container; with a container name
    every metric is also published under `[EndpointName, VariantName, ContainerName]`.
    """
    sets: list[Dimensions] = []
    if metric != "ContainerLatency":
        sets.append(variant_dimensions(identity))
    container = container_dimensions(identity)
    if container is not None:
        sets.append(container)
    return sets


def model_dimension_sets(identity: Identity, metric: str, model: str | None,
                         component: str | None) -> list[Dimensions]:
    """The extra dimension sets of an invocation metric for a named model or component.

    A multi-model endpoint's invocation also goes under `[EndpointName, VariantName,
    TargetModel]`; an inference component's under `[InferenceComponentName]`, as
    SageMaker publishes it (component names are unique in an account and Region).
    ContainerLatency stays per container only, as in `invocation_dimension_sets`.
    """
    if metric == "ContainerLatency":
        return []
    sets: list[Dimensions] = []
    if model is not None:
        sets.append((*variant_dimensions(identity), ("TargetModel", model)))
    if component is not None:
        sets.append((("InferenceComponentName", component),))
    return sets


def spool_folder(group: str, stream: str) -> str:
    """A file name for one log stream's spool folder: readable, and unique per group/stream."""
    import hashlib  # noqa: PLC0415 - only the spool needs it

    digest = hashlib.sha256(f"{group}\0{stream}".encode()).hexdigest()[:12]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in stream)[-80:]
    return f"logs-{readable}-{digest}"
