"""Sinks: where telemetry goes. They never import sources."""
