#!/usr/bin/env bash
# Unpack the installed PEFT with the patch series applied, and write the patches back from the trees.
#
#   bash upstream/refresh.sh unpack WORK   # WORK/a: installed PEFT (src/peft, empty tests/);
#                                          # WORK/b: a + 0001; WORK/c: b + 0002 (rejects left as *.rej)
#   bash upstream/refresh.sh test WORK     # the patches' own tests on WORK/b and WORK/c (check.py)
#   bash upstream/refresh.sh write WORK    # 0001/peft.patch = diff(a, b), 0002/peft.patch = diff(b, c)
#
# Edit WORK/b and WORK/c in between (an edit to b that 0002's context depends on goes into c too).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
series=("$here/0001-combination-type-hook/peft.patch" "$here/0002-cp-combination-type/peft.patch")
action="${1:?usage: refresh.sh unpack|test|write WORK}"
work="${2:?usage: refresh.sh unpack|test|write WORK}"

clean() { find "$1" \( -name __pycache__ -o -name .pytest_cache -o -name .ruff_cache \) -prune -exec rm -rf {} +; }

case "$action" in
unpack)
    peft_dir="$(python -c 'import os, peft; print(os.path.dirname(peft.__file__))')"
    mkdir -p "$work/a/src" "$work/a/tests"
    cp -r "$peft_dir" "$work/a/src/peft"
    clean "$work/a"
    cp -r "$work/a" "$work/b"
    (cd "$work/b" && git apply --reject "${series[0]}") || echo "0001 did not apply cleanly: see $work/b/**/*.rej"
    cp -r "$work/b" "$work/c"
    (cd "$work/c" && git apply --reject "${series[1]}") || echo "0002 did not apply cleanly: see $work/c/**/*.rej"
    ;;
test)
    python "$here/check.py" "$work"
    ;;
write)
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    pairs=("a b" "b c")
    for i in 0 1; do
        read -r old new <<<"${pairs[$i]}"
        clean "$work/$old" && clean "$work/$new"
        rm -rf "$scratch/a" "$scratch/b"
        cp -r "$work/$old" "$scratch/a" && cp -r "$work/$new" "$scratch/b"
        # git diff --no-index exits 1 when the trees differ
        (cd "$scratch" && git diff --no-index --src-prefix= --dst-prefix= a b >"${series[$i]}") || true
        echo "wrote ${series[$i]}"
    done
    ;;
*)
    echo "unknown action $action; expected unpack, test or write" >&2
    exit 2
    ;;
esac
