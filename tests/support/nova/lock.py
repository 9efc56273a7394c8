"""Takes Nova's external lock on a cache entry exactly as nova-compute does.

    lock.py hold INSTANCES_PATH NAME   lock, print "locked", hold until stdin closes
    lock.py try INSTANCES_PATH NAME    one non-blocking acquire: print "acquired" (and
                                       release) or "busy"; exit 0 either way

"hold" goes through nova.utils.synchronized(NAME, external=True,
lock_path=INSTANCES_PATH/locks), the decorator Nova's imagebackend and image cache manager wrap
every _base change in. "try" asks the same file through oslo.concurrency's external lock
(fasteners' InterProcessLock, fcntl.lockf) without blocking, as nothing in Nova does but a test
of who holds it needs.
"""

import os
import sys

from oslo_concurrency import lockutils


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("hold", "try"):
        raise SystemExit(__doc__)
    mode, instances_path, name = sys.argv[1:]
    lock_path = os.path.join(instances_path, "locks")

    if mode == "hold":
        from nova import utils

        @utils.synchronized(name, external=True, lock_path=lock_path)
        def held():
            print("locked", flush=True)
            sys.stdin.read()

        held()
        return

    lock = lockutils.external_lock(name, lock_file_prefix="nova-", lock_path=lock_path)
    if lock.acquire(blocking=False):
        lock.release()
        print("acquired")
    else:
        print("busy")


if __name__ == "__main__":
    main()
