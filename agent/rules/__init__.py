"""Pure rules: naming, framing, batching, scaling. No I/O, `now` is a parameter."""
