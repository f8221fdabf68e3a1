#!/usr/bin/env bash
# Install DeepSpeed 0.19.8 for benchmarks/_deepspeed_offload.py on a machine without network, from .peer/:
#   .peer/deepspeed-0.19.8.tar.gz   the sdist, built on this machine with DS_BUILD_OPS=0 (ops JIT-build on first use)
#   .peer/wheels/*.whl              what DeepSpeed imports beyond torch (cp312 manylinux x86_64 where not pure)
#   .peer/debs/libaio*.deb          libaio and its headers, for DeepSpeed's async_io (NVMe) op
# into .peer/site (pip --target) and .peer/root (dpkg -x). Run from the repository root:
#
#   eval "$(bash benchmarks/install_deepspeed_peer.sh)"      # PYTHON=/path/to/python to pick the interpreter
#
# stdout is only the export lines; a second run reinstalls nothing. Exits non-zero, naming what is missing.
#
# .peer/ is not in git; fill it on a machine with network (the versions tested on the H200, 2026-12-03):
#   pip download --no-deps --no-binary :all: deepspeed==0.19.8 -d .peer
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
#     --abi none --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform linux_x86_64 --platform any -d .peer/wheels hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 py-cpuinfo==9.0.0 msgpack==1.2.4 \
#     ninja==1.13.2 einops==0.8.2 packaging==26.4 psutil==7.2.2 tqdm==4.70.1 nvidia-ml-py setuptools==84.2.1
#   mkdir -p .peer/debs && (cd .peer/debs && apt-get download libaio1:amd64 libaio-dev:amd64)
# and carry it to the device machine (the device tool's carry=[".peer"]).
set -euo pipefail

PY=${PYTHON:-python3}
PEER=$(pwd)/.peer
SITE=$PEER/site
ROOT=$PEER/root
SDIST=$PEER/deepspeed-0.19.8.tar.gz
LOG=$PEER/install.log

die() { echo "install_deepspeed_peer: $*" >&2; exit 1; }
warn() { echo "install_deepspeed_peer: warning: $*" >&2; }

[ -d "$PEER" ] || die "no .peer/ in $(pwd): run this from the repository root, with .peer/ copied along"
[ -f "$SDIST" ] || die "missing $SDIST"
compgen -G "$PEER/wheels/*.whl" >/dev/null || die "no wheels in $PEER/wheels"
command -v "$PY" >/dev/null || die "no interpreter '$PY' (set PYTHON=...)"
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip ($PY -m ensurepip installs it offline)"

# Packages the base environment already has stay its own; the rest come from .peer/wheels. "Base": without
# .peer/site on PYTHONPATH, so that a rerun after the eval decides as the first run did.
base_path=$(printf '%s' "${PYTHONPATH:-}" | tr ':' '\n' | grep -vxF "$SITE" | paste -sd: -) || true
has() { PYTHONPATH=$base_path "$PY" -c "$1" >/dev/null 2>&1; }
want=()
for pair in hjson:hjson py_cpuinfo:cpuinfo msgpack:msgpack ninja:ninja einops:einops packaging:packaging \
            psutil:psutil tqdm:tqdm nvidia_ml_py:pynvml setuptools:setuptools; do   # setuptools: torch JIT builds
    has "import ${pair#*:}" || want+=("${pair%%:*}")
done
if ! has 'import pydantic, sys; sys.exit(int(pydantic.VERSION.split(".")[0]) < 2)'; then   # DeepSpeed needs v2
    want+=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)
fi
has 'import numpy' || die "$PY cannot import numpy (not shipped in .peer/: install numpy)"
wheels=()
for name in "${want[@]}"; do
    w=$(compgen -G "$PEER/wheels/${name}-*.whl" | head -n1) || die "missing .peer/wheels/${name}-*.whl"
    wheels+=("$w")
done

stamp="$("$PY" -c 'import sys; print(sys.version.split()[0])') ${want[*]}"
if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE"
    mkdir -p "$SITE"
    : >"$LOG"
    build_path=$base_path
    if ! has 'import setuptools'; then            # the sdist's setup.py needs it (Python 3.12 ships without)
        mkdir -p "$PEER/build-tools"
        "$PY" -m pip install -q --no-deps --no-index --target "$PEER/build-tools" \
            "$PEER"/wheels/setuptools-*.whl >>"$LOG" 2>&1 || die "setuptools install failed; see $LOG"
        build_path=$PEER/build-tools${build_path:+:$build_path}
    fi
    echo "install_deepspeed_peer: installing DeepSpeed into $SITE" >&2
    # one pip call: --target moves everything in at once (a second call would skip its existing bin/)
    DS_BUILD_OPS=0 PYTHONPATH=$build_path "$PY" -m pip install -q --no-deps --no-index --no-build-isolation \
        --target "$SITE" ${wheels[@]+"${wheels[@]}"} "$SDIST" >>"$LOG" 2>&1 \
        || { tail -n 20 "$LOG" >&2; die "install failed; see $LOG"; }
    echo "$stamp" >"$SITE/.installed"
fi
PYTHONPATH=$SITE${base_path:+:$base_path} "$PY" -c \
    'import importlib.metadata as m; assert m.version("deepspeed") == "0.19.8"' 2>/dev/null \
    || die "deepspeed 0.19.8 is not importable from $SITE (delete $SITE and rerun)"

# DeepSpeed JIT-builds its CPU Adam with the host compiler, ninja and Python's headers.
command -v c++ >/dev/null || warn "no c++ compiler: DeepSpeedCPUAdam (optimizer offload) cannot be built"
has 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    || warn "no Python.h for $PY: DeepSpeed's JIT-built ops (CPU Adam, async_io) will fail"

echo "export PYTHONPATH=\"$SITE\${PYTHONPATH:+:\$PYTHONPATH}\""
echo "export PATH=\"$SITE/bin:\$PATH\""
echo "export TORCH_CUDA_ARCH_LIST=9.0"
if compgen -G "$PEER/debs/libaio*.deb" >/dev/null; then
    if [ ! -f "$ROOT/usr/include/libaio.h" ]; then
        mkdir -p "$ROOT"
        for deb in "$PEER"/debs/libaio*.deb; do
            if command -v dpkg >/dev/null; then
                dpkg -x "$deb" "$ROOT"
            else                                    # a .deb is an ar archive holding data.tar.*
                tmp=$(mktemp -d)
                if ! { (cd "$tmp" && ar x "$deb") && tar -xf "$tmp"/data.tar.* -C "$ROOT"; }; then
                    die "cannot unpack $deb (no dpkg, and ar/tar failed)"
                fi
                rm -rf "$tmp"
            fi
        done
    fi
    lib=$ROOT/usr/lib/x86_64-linux-gnu
    inc=$ROOT/usr/include
    [ -f "$inc/libaio.h" ] || die "libaio.h missing after unpacking .peer/debs"
    echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
    echo "export LIBRARY_PATH=\"$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""   # gcc: -laio at link time
    echo "export CPATH=\"$inc\${CPATH:+:\$CPATH}\""                         # gcc: libaio.h
    echo "export CFLAGS=\"-I$inc\${CFLAGS:+ \$CFLAGS}\""                    # DeepSpeed's libaio probe
    echo "export LDFLAGS=\"-L$lib\${LDFLAGS:+ \$LDFLAGS}\""
else
    warn "no .peer/debs/libaio*.deb: the nvme variant needs libaio-dev on the system"
fi
