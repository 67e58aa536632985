#!/usr/bin/env bash
# Set up .venv (torch CPU + flashckpt) and run the crash-and-resume demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/python examples/demo.py
