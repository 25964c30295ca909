#!/bin/sh
# Installs one hashed lock into /opt/venv from /wheels without an index, then drops what only installing
# needs (pip, setuptools) and the packages' own test suites: about a quarter of the venv, never imported.
set -eu
lock="$1"
pip install --no-cache-dir --no-index --find-links /wheels --require-hashes -r "$lock"
pip uninstall --quiet --yes pip setuptools
find /opt/venv/lib/python3*/site-packages -depth -type d -name tests -exec rm -rf {} +
