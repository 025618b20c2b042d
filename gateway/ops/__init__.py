"""What operators read: the access log, Prometheus metrics, log-safe text."""
