"""Start flannelpy's flanneld from a given source tree, for the side-by-side benchmark.

    python fp_launch.py TREE [flanneld flags...]

TREE is a directory holding a `flannelpy/` package (vs_flanneld.py extracts the committed one
with `git archive`, so a run measures a commit even while others edit the work tree), or `-`
for whatever `import flannelpy` finds.  The editable install's import hook would win over
sys.path, so it is taken out first.  Otherwise this is exactly the `flanneld` console script.

FLANNELPY_BENCH_CPROFILE=FILE: run under cProfile (the trio thread only) and write the stats to
FILE when the agent exits (SIGTERM ends it cleanly).  Handled here, not in flannelpy.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    tree, args = sys.argv[1], sys.argv[2:]
    if tree != "-":
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path.insert(0, os.path.abspath(tree))
    sys.argv = ["flanneld", *args]
    profile_to = os.environ.pop("FLANNELPY_BENCH_CPROFILE", "")
    from flannelpy.cli.flanneld import main as flanneld_main

    if not profile_to:
        return flanneld_main(args)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(flanneld_main, args)
    finally:
        prof.dump_stats(profile_to)


if __name__ == "__main__":
    sys.exit(main())
