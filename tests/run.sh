#!/usr/bin/env bash
# The README's test command: installs what the suite needs that is missing (the Debian DICOM peers
# DCMTK, dicom3tools and Orthanc, and redis-server for scale-out; the package with its test extras), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
python3 -m pip install -q -e '.[test]'

set +e
python3 -m pytest "$@"
status=$?
set -e
case $status in
  0) ;;
  5) echo "tests/run.sh: pytest collected no tests: the suite is missing, which is a failure" >&2; status=1 ;;
  *) echo "tests/run.sh: pytest exited with status $status" >&2 ;;
esac
exit $status
