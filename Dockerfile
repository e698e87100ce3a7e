# A model image with the telemetry agent as its entrypoint.
# SageMaker runs `docker run IMAGE serve`: "serve" replaces CMD and runs under the agent.
FROM python:3.11-slim

# Inference pipelines and multi-container endpoints pass the port in SAGEMAKER_BIND_TO_PORT.
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin model
WORKDIR /opt/program

COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir . && rm -rf /root/.cache

COPY examples ./examples
RUN install -m 0755 examples/serve /usr/local/bin/serve

# Dry run by default: set AWS_REGION (or TELEMETRY_CLOUDWATCH=on) and the names to ship.
# The proxy takes SageMaker's port (SAGEMAKER_BIND_TO_PORT or 8080) and moves the model
# server to 8081 behind it, to time every request.
ENV TELEMETRY_RESOURCE=endpoint \
    TELEMETRY_PROMETHEUS=127.0.0.1:9464 \
    TELEMETRY_PROXY_LISTEN=auto \
    TELEMETRY_PROXY_UPSTREAM=127.0.0.1:8081 \
    PYTHONUNBUFFERED=1

USER model
EXPOSE 8080
ENTRYPOINT ["telemetry-agent", "run", "--"]
CMD ["serve"]
