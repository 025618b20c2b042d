"""The upstream: the HTTP client that owns its session, result downloads, and the simulator."""
