# Sourced by every launch script under examples/mcore/<family>/; defines two things:
#   ENGINE_ROOT  the repository root, so a script runs from any directory
#                (relative paths in the scripts are relative to where you run them);
#   run CMD...   runs CMD, or with DRY_RUN=1 prints it as one shell-quoted line and runs nothing.
# tests/unit/test_launch_scripts.py runs each script with DRY_RUN=1 and checks every printed
# command with the project's own parsers, so the scripts cannot drift from the flags.
ENGINE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}
