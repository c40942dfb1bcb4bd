#!/bin/sh
# Build udp_encap.bpf.o from udp_encap.bpf.c, reproducibly: the same clang gives the same bytes
# wherever the tree is checked out (paths mapped to ".", DWARF stripped; BTF, which the loader
# needs, stays).  tests/test_udp_bpf.py rebuilds into a temporary file and compares with the
# shipped object when this clang major version is present.
#   build.sh [OUTPUT]      (default: udp_encap.bpf.o beside this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/udp_encap.bpf.o}
triplet=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
cd "$here"
clang -O2 -g -target bpf -Wall -Werror -I"/usr/include/$triplet" \
    -fdebug-prefix-map="$here"=. -fdebug-compilation-dir=. \
    -c udp_encap.bpf.c -o "$out.tmp"
llvm-strip -g "$out.tmp"
mv "$out.tmp" "$out"
