#!/bin/sh
# Start the ComfyUI-Distributed master and workers: ./launch_distributed.sh --help
# All the logic is in distributed_core/launcher.py; this only picks the Python to run it with.
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
if [ -n "$VIRTUAL_ENV" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then python="$VIRTUAL_ENV/bin/python"
elif command -v python3 >/dev/null 2>&1; then python=python3
else python=python
fi
# By path rather than with -m, which would need a cd: relative paths in the arguments keep working.
exec "$python" "$here/distributed_core/launcher.py" "$@"
