#!/usr/bin/env bash
# Produce the public repository of the extension (https://github.com/MAISSegment/SlicerMAISSegment, the
# EXTENSION_HOMEPAGE of CMakeLists.txt and the scm_url of MAISSegment.json) as a fresh git repository: one commit
# holding the tracked tree of a commit of this checkout (default HEAD), so that its history carries only the current
# bundled weights. Then measure a fresh `git clone` of it (.git and checkout, as the Extensions Index checker does:
# limit 100 MB) and, when given a copy of Slicer/ExtensionsIndex, run that index's checker on it offline
# (scripts/check_extension_offline.py: the clone comes from the new repository, the raw URLs of the icon and the
# screenshots are served from its files; only the GitHub topic check needs the published repository).
#
#   bash scripts/release_repository.sh OUT_DIR [options]
#     --ref REF                 the commit to release (default HEAD; never the working tree's uncommitted files)
#     --source DIR              the repository to release from (default: this checkout)
#     --contributors "A (X), B (Y)"  EXTENSION_CONTRIBUTORS of the released CMakeLists.txt (real names, Slicer's
#                               "Name (Affiliation)" form; without it the project's placeholder stays and a warning
#                               is printed)
#     --extensions-index DIR    a checkout of Slicer/ExtensionsIndex (its scripts/check_description_files.py and the
#                               other extensions' .json files); the checker's licence is not stated, so it is not
#                               copied here: pass the path (or set MAIS_EXTENSIONS_INDEX)
#     --schema FILE             Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json, for the checker's
#                               schema check without the network (or set MAIS_EXTENSION_SCHEMA)
#     --max-mb N                the clone size limit in MiB (default 100, the checker's)
#
# Publishing (by a maintainer, once): create the empty GitHub repository MAISSegment/SlicerMAISSegment with the
# topic "3d-slicer-extension", then `git -C OUT_DIR push git@github.com:MAISSegment/SlicerMAISSegment.git main`,
# and submit MAISSegment.json to Slicer/ExtensionsIndex. This script touches nothing in the source repository.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SOURCE="$(cd "$HERE/.." && pwd)"
REF=HEAD
CONTRIBUTORS=""
INDEX="${MAIS_EXTENSIONS_INDEX:-}"
SCHEMA="${MAIS_EXTENSION_SCHEMA:-}"
MAX_MB=100
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ref) REF="$2"; shift 2 ;;
    --source) SOURCE="$(cd "$2" && pwd)"; shift 2 ;;
    --contributors) CONTRIBUTORS="$2"; shift 2 ;;
    --extensions-index) INDEX="$2"; shift 2 ;;
    --schema) SCHEMA="$2"; shift 2 ;;
    --max-mb) MAX_MB="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "release_repository: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "release_repository: one output folder only" >&2; exit 2; }; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash scripts/release_repository.sh OUT_DIR [options] (--help)" >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "release_repository: $OUT exists and is not empty; choose a new folder" >&2; exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "$OUT/" in "$SOURCE"/*) echo "release_repository: $OUT is inside the source repository" >&2; exit 2 ;; esac

COMMIT="$(git -C "$SOURCE" rev-parse --verify "$REF^{commit}")"
VERSION="$( (git -C "$SOURCE" show "$COMMIT:pyproject.toml" 2>/dev/null || true) | sed -n 's/^version = "\(.*\)"/\1/p' | head -1)"
echo "== exporting the tracked tree of $COMMIT (MAISSegment ${VERSION:-?}) into $OUT"
git -C "$SOURCE" archive --format=tar "$COMMIT" | tar -x -C "$OUT"

if [ -n "$CONTRIBUTORS" ]; then
  CONTRIBUTORS="$CONTRIBUTORS" python3 - "$OUT/CMakeLists.txt" <<'PY'
import os, re, sys
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
value = os.environ["CONTRIBUTORS"].replace('"', "'")
text, n = re.subn(r'set\(EXTENSION_CONTRIBUTORS "[^"]*"\)', lambda m: f'set(EXTENSION_CONTRIBUTORS "{value}")', text)
if n != 1:
    sys.exit("release_repository: no EXTENSION_CONTRIBUTORS line in CMakeLists.txt")
open(path, "w", encoding="utf-8").write(text)
PY
  echo "   EXTENSION_CONTRIBUTORS: $CONTRIBUTORS"
else
  echo "   warning: EXTENSION_CONTRIBUTORS keeps the project placeholder; pass --contributors \"Name (Affiliation)\""
fi

echo "== one commit, branch main"
git -C "$OUT" init --quiet --initial-branch=main
git -C "$OUT" add --all
NAME="$(git -C "$SOURCE" config user.name || echo "MAISSegment release")"
EMAIL="$(git -C "$SOURCE" config user.email || echo "release@maissegment.invalid")"
git -C "$OUT" -c user.name="$NAME" -c user.email="$EMAIL" commit --quiet \
  -m "MAISSegment ${VERSION:-} (from commit $COMMIT of the development repository)"

echo "== measuring a fresh clone"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git clone --quiet "file://$OUT" "$WORK/SlicerMAISSegment"
BYTES="$(python3 -c "import pathlib,sys; print(sum(f.stat().st_size for f in pathlib.Path(sys.argv[1]).rglob('*') if f.is_file()))" "$WORK/SlicerMAISSegment")"
GIT_BYTES="$(python3 -c "import pathlib,sys; print(sum(f.stat().st_size for f in pathlib.Path(sys.argv[1]).rglob('*') if f.is_file()))" "$WORK/SlicerMAISSegment/.git")"
MIB="$(python3 -c "print(f'{$BYTES / 2**20:.1f}')")"
echo "   clone: $MIB MiB in all ($BYTES bytes: .git $GIT_BYTES, checkout $((BYTES - GIT_BYTES))); limit $MAX_MB MiB"
echo "   largest files:"
# the listing is read whole before it is cut (no early-closed pipe: SIGPIPE would fail the script under pipefail)
largest="$(cd "$WORK/SlicerMAISSegment" && git ls-files -z | xargs -0 du -b | sort -rn)"
printf '%s\n' "$largest" | sed -n '1,5s/^/     /p'

STATUS=0
if ! python3 -c "import sys; sys.exit(0 if $BYTES / 2**20 <= $MAX_MB else 1)"; then
  echo "release_repository: the clone is $MIB MiB, over the $MAX_MB MiB limit of the Extensions Index" >&2
  STATUS=1
fi

if [ -n "$INDEX" ]; then
  echo "== Extensions Index checker (offline) on $OUT"
  # the checker needs Python >= 3.12 (its f-strings) and jsonschema + requests (its scripts/requirements.txt)
  CHECKER_PYTHON="${CHECKER_PYTHON:-}"
  if [ -z "$CHECKER_PYTHON" ]; then
    for candidate in python3.13 python3.12 python3; do
      if "$candidate" -c "import sys; sys.exit(sys.version_info < (3, 12))" >/dev/null 2>&1; then
        CHECKER_PYTHON="$candidate"; break
      fi
    done
  fi
  [ -n "$CHECKER_PYTHON" ] || { echo "release_repository: the checker needs Python >= 3.12 (set CHECKER_PYTHON)" >&2; exit 1; }
  if ! "$CHECKER_PYTHON" -c "import jsonschema" 2>/dev/null; then
    "$CHECKER_PYTHON" -m venv "$WORK/checker-venv"
    "$WORK/checker-venv/bin/python" -m pip install --quiet --disable-pip-version-check jsonschema requests \
      >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; echo "release_repository: pip failed" >&2; exit 1; }
    CHECKER_PYTHON="$WORK/checker-venv/bin/python"
  fi
  "$CHECKER_PYTHON" "$HERE/check_extension_offline.py" --extensions-index "$INDEX" --repository "$OUT" \
    ${SCHEMA:+--schema "$SCHEMA"} || STATUS=1
else
  echo "== Extensions Index checker not run (give --extensions-index DIR, a checkout of Slicer/ExtensionsIndex)"
fi
[ "$STATUS" = 0 ] && echo "== released: $OUT (push it as described at the top of this script)"
exit "$STATUS"
