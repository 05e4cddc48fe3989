#!/usr/bin/env bash
# Install detectron2 into the Python environment given by $PYTHON (default: python3 on PATH).
#
# Routes, tried in this order (the route taken is printed on the last line):
#   1. existing  an importable detectron2 is kept as it is;
#   2. source    the official repository at a pinned commit ($AGVM_D2_REF, default
#                02b5c4e295e9..., the snapshot the test suite passed on, compiled with its
#                C++ ops), built from source, when github.com answers within
#                $AGVM_D2_PROBE_TIMEOUT seconds (default 5); if that build fails, the sdist
#                route below is taken with a message (unless AGVM_D2_ROUTE=source);
#   3. sdist     the PyPI sdist pb1-detectron2==0.6, whose Python sources are the official v0.6
#                tag's, installed as the pure-Python distribution `detectron2` 0.6 without the
#                C++ ops (agvm.compat supplies what is missing; see docs/install.md).
#
# Environment:
#   PYTHON                 interpreter to install into (default: python3)
#   AGVM_D2_ROUTE          auto (default) | source | sdist: force one route (skips "existing" too)
#   AGVM_D2_PROBE_TIMEOUT  seconds to wait for github.com (default 5)
#   AGVM_D2_REPO           the repository URL probed and built (default the official one)
#   AGVM_D2_REF            git ref of the official repository for the source route (default: the
#                          pinned commit below; e.g. "main" for today's head, at your own risk)
#   AGVM_D2_PIP_SOURCE     what pip installs on the source route (default git+<repo>@<ref>; the
#                          tests point it at a stub)
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROUTE=${AGVM_D2_ROUTE:-auto}
PROBE_TIMEOUT=${AGVM_D2_PROBE_TIMEOUT:-5}
D2_REPO=${AGVM_D2_REPO:-https://github.com/facebookresearch/detectron2}
D2_PINNED=02b5c4e295e990042a714712c21dc79b731e8833  # 2026-06-06; the suite passes on it (see docs/install.md)
D2_REF=${AGVM_D2_REF:-$D2_PINNED}
SDIST_SPEC="pb1-detectron2==0.6"
D2_RUNTIME_DEPS="Pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard fvcore iopath omegaconf hydra-core"
SDIST_NAME="pb1-detectron2-0.6.tar.gz"
SDIST_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

say() { echo "[install_detectron2] $*"; }
die() { echo "[install_detectron2] ERROR: $*" >&2; exit 1; }

case "$ROUTE" in
  auto|source|sdist) ;;
  *) die "AGVM_D2_ROUTE='$ROUTE' is not one of: auto, source, sdist" ;;
esac

d2_version() {
  "$PYTHON" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))' 2>/dev/null
}

if [ "$ROUTE" = auto ] && info=$(d2_version); then
  say "route: existing (detectron2 $info)"
  exit 0
fi

github_reachable() {
  GIT_TERMINAL_PROMPT=0 timeout "$PROBE_TIMEOUT" git ls-remote "$D2_REPO" HEAD >/dev/null 2>&1
}

install_from_source() {
  say "building detectron2 from $D2_REPO@$D2_REF (C++ ops included; takes several minutes)"
  # setup.py imports torch, so the build must see the environment's torch.
  "$PYTHON" -m pip install --no-build-isolation "${AGVM_D2_PIP_SOURCE:-git+$D2_REPO.git@$D2_REF}"
}

install_from_sdist() {
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  say "downloading $SDIST_SPEC"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$work" "$SDIST_SPEC" || die "could not download $SDIST_SPEC from the package index"
  local file="$work/$SDIST_NAME"
  [ -f "$file" ] || die "expected $SDIST_NAME in the download folder, found: $(ls "$work")"
  local got
  got=$(sha256sum "$file" | cut -d' ' -f1)
  [ "$got" = "$SDIST_SHA256" ] || die "sha256 mismatch for $SDIST_NAME: got $got, expected $SDIST_SHA256; refusing to install"
  say "sha256 ok ($SDIST_SHA256)"
  tar -xzf "$file" -C "$work"
  local src="$work/pb1-detectron2-0.6"
  # The sdist's setup.py compiles C++ sources it does not contain and pins black==21.4b2:
  # replace its build description with a pure-Python one for the `detectron2` package only.
  rm -rf "$src/setup.py" "$src/setup.cfg" "$src"/*.egg-info "$src/tools" "$src/projects"
  cat > "$src/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 0.6 Python sources (from the pb1-detectron2 sdist), without C++ ops"
requires-python = ">=3.7"

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"*" = ["*.yaml", "**/*.yaml", "**/*.py"]
TOML
  "$PYTHON" -m pip install --quiet --no-deps "$src"
  # detectron2 0.6's runtime requirements (its setup.py's, without its black==21.4b2 pin); already
  # satisfied under `make install` (requirements.txt pins them), needed after a bare `pip install .`
  "$PYTHON" -m pip install --quiet $D2_RUNTIME_DEPS
}

if [ "$ROUTE" = source ]; then
  install_from_source || die "the source build of detectron2@$D2_REF failed (AGVM_D2_ROUTE=source: no fallback)"
  taken=source
elif [ "$ROUTE" = auto ] && github_reachable; then
  if install_from_source; then
    taken=source
  else
    say "the source build of detectron2@$D2_REF failed (see pip's output above); falling back to the verified sdist route"
    install_from_sdist
    taken=sdist
  fi
else
  [ "$ROUTE" = auto ] && say "github.com not reachable within ${PROBE_TIMEOUT}s; using the PyPI sdist"
  install_from_sdist
  taken=sdist
fi

info=$(d2_version) || die "detectron2 still does not import after the '$taken' route"
say "route: $taken (detectron2 $info)"
