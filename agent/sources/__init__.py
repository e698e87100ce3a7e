"""Sources: where telemetry comes from. They emit values; they never import sinks."""
