"""Docker integration: daemon.json (bip, mtu, fixed-cidr, ip-masq), mk-docker-opts.sh's DOCKER_OPTS file, and
fixed overlay addresses for containers (flannelctl attach)."""
