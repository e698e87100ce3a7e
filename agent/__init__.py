"""SageMaker-style telemetry agent for model containers.

The agent supervises the model server, turns what the container does into
CloudWatch metrics and logs with SageMaker's names, and serves the same figures
on a local Prometheus endpoint.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
