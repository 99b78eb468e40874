#!/usr/bin/env bash
# Called by .ci/run before `make test`: start the local services the tests use. Never fails CI:
# when a service cannot start, the tests that need it skip with the reason.
cd "$(dirname "$0")/.." || exit 0
if [ "$(id -u)" = 0 ] && command -v slurmctld >/dev/null 2>&1; then
  bash tests/slurm_setup.sh || echo "services_up: Slurm did not start; tests/test_slurm.py will skip"
else
  echo "services_up: Slurm not installed or not root; tests/test_slurm.py will skip"
fi
exit 0
