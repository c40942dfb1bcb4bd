"""Docker integration: daemon.json (bip, mtu) and mk-docker-opts.sh's DOCKER_OPTS file."""
