"""What the agent is told: flanneld's command-line flags and the network config JSON from etcd (pure)."""
