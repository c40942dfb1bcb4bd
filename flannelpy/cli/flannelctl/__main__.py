"""`python -m flannelpy.cli.flannelctl` runs flannelctl (etc/mk-docker-opts.sh and tests use it)."""

import sys

from flannelpy.cli.flannelctl import main

sys.exit(main())
