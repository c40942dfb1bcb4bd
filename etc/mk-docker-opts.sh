#!/bin/sh
# mk-docker-opts.sh for flannelpy: same options and output as flannel's dist/mk-docker-opts.sh.
MK_DOCKER_OPTS_NAME="$0"
export MK_DOCKER_OPTS_NAME
if command -v flannelctl >/dev/null 2>&1; then
	exec flannelctl docker-opts "$@"
fi
exec python3 -m flannelpy.cli.flannelctl docker-opts "$@"
