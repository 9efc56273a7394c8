"""Downloads one image into _base the way Nova's libvirt driver does, with Nova's own code.

    fetch_to_raw.py [--go-on-stdin] INSTANCES_PATH GLANCE_URL IMAGE_ID

With --go-on-stdin it prints "ready" once Nova is imported and configured and waits for a line on
stdin before it takes the lock, so a test can start it at the same moment as another process.
OS_AUTH_TOKEN, if set, is sent as X-Auth-Token (the tests' Glance runs without auth).

Under nova.utils.synchronized(sha1(IMAGE_ID), external=True, lock_path=INSTANCES_PATH/locks) it
skips the download when _base/<sha1> exists (imagebackend's fetch_func_sync) and otherwise runs
nova.virt.images.fetch_to_raw: download to <target>.part, deep inspection, qemu-img info, convert
to <target>.converted and rename (force_raw_images defaults to True). Only the two calls Nova
makes to Glance are stubbed (nova.image.glance.API.get and .download), with plain requests to
Glance's v2 HTTP API, so no Keystone session is needed. Prints {"downloaded": bool} as JSON.
"""

import hashlib
import json
import os
import shutil
import sys
import urllib.request

import common


def main():
    args = sys.argv[1:]
    go_on_stdin = bool(args) and args[0] == "--go-on-stdin"
    if go_on_stdin:
        args = args[1:]
    if len(args) != 3:
        raise SystemExit(__doc__)
    instances_path, url, image_id = args
    token = os.environ.get("OS_AUTH_TOKEN")
    conf = common.setup(instances_path)

    from nova import context as nova_context
    from nova.image import glance
    from nova import utils
    from nova.virt import images
    from oslo_utils import fileutils

    def request(path):
        req = urllib.request.Request(url.rstrip("/") + path)
        if token:
            req.add_header("X-Auth-Token", token)
        return urllib.request.urlopen(req, timeout=60)

    def get(self, context, image_id, **kwargs):
        with request("/v2/images/%s" % image_id) as resp:
            return json.load(resp)

    def download(self, context, image_id, data=None, dest_path=None, trusted_certs=None):
        with request("/v2/images/%s/file" % image_id) as resp, open(dest_path, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())

    glance.API.get = get
    glance.API.download = download

    name = hashlib.sha1(image_id.encode("utf-8")).hexdigest()
    base_dir = os.path.join(instances_path, conf.image_cache.subdirectory_name)
    fileutils.ensure_tree(base_dir)
    target = os.path.join(base_dir, name)
    downloaded = False

    @utils.synchronized(name, external=True, lock_path=os.path.join(instances_path, "locks"))
    def fetch_func_sync():
        nonlocal downloaded
        if not os.path.exists(target):
            images.fetch_to_raw(nova_context.get_admin_context(), image_id, target)
            downloaded = True

    if go_on_stdin:
        print("ready", flush=True)
        sys.stdin.readline()
    fetch_func_sync()
    print(json.dumps({"downloaded": downloaded}))


if __name__ == "__main__":
    main()
