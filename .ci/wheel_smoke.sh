#!/usr/bin/env bash
# MedTune as a user gets it: build the wheel, install it into a fresh virtual environment outside the
# source tree, and run each command once on a few synthetic records. Catches what the test suite,
# run from the checkout, cannot: a file the package reads but the wheel does not ship.
#
# usage: .ci/wheel_smoke.sh   (from .ci/run, after the tests, with the project's .venv active:
#                              python3.11, git and the package registries are needed)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d -t medtune-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/dist" "$work/run"

# 1. The wheel, built from a copy of the checkout's files (tracked, and new ones git does not ignore):
#    setuptools builds inside the source tree, and a stale build/ there would leak old modules in.
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null -T - --ignore-failed-read -cf - | tar -C "$work/src" -xf -
python -m pip wheel --quiet --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/medtune-*.whl)"
echo "wheel: $(basename "$wheel"), $(stat -c %s "$wheel") bytes"

# 2. The FAB (`flwr build`, `flwr run .`) packs exactly the wheel's files, by Flower's own rules.
python - "$wheel" "$work/src" <<'EOF'
import sys, tomllib, warnings, zipfile
from pathlib import Path

warnings.simplefilter("ignore", DeprecationWarning)  # pathspec's, inside Flower's FAB builder
from flwr.cli.build import get_filtered_fab_paths
from flwr.cli.utils import collect_files, filter_paths_for_publish

wheel, src = sys.argv[1], Path(sys.argv[2])
installed = {name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
config = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
fab = set(get_filtered_fab_paths(filter_paths_for_publish(collect_files(src)), config))
if fab != installed:
    sys.exit(f"FAB and wheel differ: FAB only {sorted(fab - installed)}, wheel only {sorted(installed - fab)}")
print(f"FAB = wheel: {len(fab)} files")
EOF

# 3. A fresh environment, installed as the README says (CPU torch first, then MedTune with the constraints).
python3.11 -m venv "$work/venv"
pip="$work/venv/bin/pip"
echo "install torch:"
time "$pip" install --quiet torch==2.13.0
echo "install the wheel:"
time "$pip" install --quiet -c "$repo/constraints.txt" "$wheel"

# 4. Each command once, from a folder where the source tree cannot be imported.
cd "$work/run"
export PATH="$work/venv/bin:$PATH"
unset PYTHONPATH
location="$(python -c 'import medtune, simulations; print(medtune.__file__, simulations.__file__)')"
[[ "$location" == "$work/venv/"*" $work/venv/"* ]] || { echo "error: MedTune imported from outside the fresh venv: $location" >&2; exit 1; }

summary=()
step() {  # step COMMAND...: run one MedTune command and report its wall time and exit status; stop at a failure
    local start=${EPOCHREALTIME/./} status=0
    echo "--- $*"
    "$@" || status=$?
    local ms=$(( (${EPOCHREALTIME/./} - start) / 1000 ))
    summary+=("$(printf '%4d.%03d s  exit %d  %s' $((ms / 1000)) $((ms % 1000)) "$status" "$*")")
    echo "--- ${summary[-1]}"
    return "$status"
}
step medtune --help
step medtune data synth --hospitals 2 --records 30 --out data
step medtune train --data data/hospital_1.csv --epochs 1 --max-length 32 --out train
step medtune predict --checkpoint train --text "crushing chest pain radiating to the left arm"
step medtune simulate --rounds 1 --out sim --run-config "hospitals=2 min-hospitals=2 records-per-hospital=30 max-length=32"
# A site: its keys and site file, checked up front; then the FAB a coordinator would send from this checkout,
# which must be exactly the code this wheel installed (`medtune site review` exits 1 on any difference).
step medtune certs server --host 127.0.0.1 --out certs
step medtune certs node --hospital h1 --out keys
cat > site.toml <<TOML
hospital = "h1"
superlink = "127.0.0.1:9093"
root-certificates = "$PWD/certs/ca.crt"
auth-key = "$PWD/keys/h1"
data-path = "$PWD/data/hospital_1.csv"
text-column = "text"
label-column = "label"
ledger-path = "$PWD/ledger.json"
max-epsilon = 8.0
TOML
step medtune site check site.toml
step flwr build --app "$work/src"
step medtune site review "$(ls "$PWD"/*.fab)"

echo "wheel smoke test passed:"
printf '%s\n' "${summary[@]}"
