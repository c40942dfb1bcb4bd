"""Operating the agent: health/readiness HTTP server, Prometheus metrics, agent state, sd_notify, logging."""
