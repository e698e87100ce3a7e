"""Naming rules against every row of docs/metrics.md's tables (namespaces, dimensions, logs)."""

from __future__ import annotations

import pytest

from agent.model import Identity, Resource
from agent.rules import naming


def ident(resource: Resource, container: str | None = None, host: str = "i-0abc") -> Identity:
    return Identity(resource=resource, endpoint_name="ep", variant_name="AllTraffic",
                    container_name=container, job_name="job", host=host, start_epoch=1700000000)


LOG_TABLE = [
    # resource, container, host, group, stream
    (Resource.ENDPOINT, None, "i-0abc", "/aws/sagemaker/Endpoints/ep", "AllTraffic/i-0abc"),
    (Resource.ENDPOINT, "c1", "i-0abc", "/aws/sagemaker/Endpoints/ep", "AllTraffic/i-0abc/c1"),
    (Resource.TRAINING, None, "algo-2", "/aws/sagemaker/TrainingJobs", "job/algo-2-1700000000"),
    (Resource.TRAINING, "c1", "algo-1", "/aws/sagemaker/TrainingJobs", "job/algo-1-1700000000"),
    (Resource.TRANSFORM, None, "i-0abc", "/aws/sagemaker/TransformJobs", "job/i-0abc-1700000000"),
    (Resource.TRANSFORM, "c1", "i-0abc", "/aws/sagemaker/TransformJobs",
     "job/i-0abc-1700000000/c1"),
    (Resource.PROCESSING, None, "algo-1", "/aws/sagemaker/ProcessingJobs", "job/algo-1-1700000000"),
]


class TestLogNames:
    @pytest.mark.parametrize(("resource", "container", "host", "group", "stream"), LOG_TABLE)
    def test_sagemaker_table(self, resource: Resource, container: str | None, host: str,
                             group: str, stream: str) -> None:
        """Group and stream follow SageMaker's table for each resource."""
        identity = ident(resource, container, host)
        assert naming.log_group(identity) == group
        assert naming.log_stream(identity) == stream

    def test_overrides_fill_placeholders(self) -> None:
        """Overrides may use {endpoint} {variant} {container} {job} {host} {epoch}."""
        identity = ident(Resource.ENDPOINT, "c1")
        assert naming.log_group(identity, "/custom/{endpoint}") == "/custom/ep"
        assert (naming.log_stream(identity, "{variant}-{host}-{container}-{epoch}")
                == "AllTraffic-i-0abc-c1-1700000000")

    def test_stream_never_has_forbidden_characters(self) -> None:
        """':' and '*' are not allowed in stream names and are replaced."""
        assert naming.log_stream(ident(Resource.ENDPOINT, host="a:b*c")) == "AllTraffic/a_b_c"


class TestMetricNames:
    @pytest.mark.parametrize(("resource", "namespace", "host_dim"), [
        (Resource.ENDPOINT, "Root/Endpoints", "ep/AllTraffic/i-0abc"),
        (Resource.TRAINING, "Root/TrainingJobs", "job/i-0abc"),
        (Resource.TRANSFORM, "Root/TransformJobs", "job/i-0abc"),
        (Resource.PROCESSING, "Root/ProcessingJobs", "job/i-0abc"),
    ])
    def test_instance_namespace_and_host(self, resource: Resource, namespace: str,
                                         host_dim: str) -> None:
        """Instance metrics: `<root>/<Kind>` and the Host dimension format."""
        identity = ident(resource)
        assert naming.instance_namespace("Root", resource) == namespace
        assert naming.host_dimension(identity) == host_dim
        assert naming.instance_dimension_sets(identity) == [(("Host", host_dim),)]

    def test_training_host_is_algo_n(self) -> None:
        """Training's Host is `<job>/algo-N`."""
        assert naming.host_dimension(ident(Resource.TRAINING, host="algo-3")) == "job/algo-3"

    def test_container_view_added_with_container_name(self) -> None:
        """With a container name the instance metrics get the per-container view too."""
        sets = naming.instance_dimension_sets(ident(Resource.ENDPOINT, "c1"))
        assert sets == [(("Host", "ep/AllTraffic/i-0abc"),),
                        (("EndpointName", "ep"), ("VariantName", "AllTraffic"),
                         ("ContainerName", "c1"))]

    @pytest.mark.parametrize(("metric", "container", "expected"), [
        ("Invocations", None, [("EndpointName", "VariantName")]),
        ("ModelLatency", None, [("EndpointName", "VariantName")]),
        ("ContainerLatency", None, []),
        ("Invocations", "c1", [("EndpointName", "VariantName"),
                               ("EndpointName", "VariantName", "ContainerName")]),
        ("ContainerLatency", "c1", [("EndpointName", "VariantName", "ContainerName")]),
    ])
    def test_invocation_dimension_sets(self, metric: str, container: str | None,
                                       expected: list[tuple[str, ...]]) -> None:
        """Invocation metrics per variant; ContainerLatency only per container."""
        sets = naming.invocation_dimension_sets(ident(Resource.ENDPOINT, container), metric)
        assert [tuple(name for name, _ in dims) for dims in sets] == expected

    def test_invocation_namespace_is_root(self) -> None:
        """Invocation metrics live in the root namespace (mirroring AWS/SageMaker)."""
        assert naming.invocation_namespace("SageMakerAgent") == "SageMakerAgent"
