"""Runs Nova's libvirt image cache manager once over an instances path, as nova-compute's
periodic task does, and prints what it left and removed as JSON on stdout.

    cache_manager.py INSTANCES_PATH INSTANCES_JSON [group.option=value ...]

INSTANCES_JSON names a file with the instances Nova's database would list for this host: a list
of objects with ``uuid`` and optional ``name``, ``image_ref``, ``kernel_id``, ``ramdisk_id``,
``os_type``, ``task_state``, ``vm_state``, ``ephemeral_gb``, ``swap_mb``. Only the database side
is stubbed: the instance list (plain objects with the attributes
nova.virt.imagecache.ImageCacheManager._list_running_instances reads),
BlockDeviceMappingList.bdms_by_instance_uuid (real BlockDeviceMapping objects, one blank local
disk per ephemeral and one swap disk, as the API makes for such a flavor) and the privsep
daemon's utime (os.utime). Everything else -- scanning _base, qemu-img info of each instance's
disk, the age checks, the locks and the removals -- is Nova's code.
"""

import json
import os
import sys
import types

import common


def files(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    instances_path, listing = sys.argv[1], sys.argv[2]
    conf = common.setup(instances_path, sys.argv[3:])

    from nova import context as nova_context
    from nova import objects
    import nova.privsep.path
    from nova.virt.libvirt import imagecache

    with open(listing) as f:
        wanted = json.load(f)

    instances, bdms = [], {}
    for i, w in enumerate(wanted):
        flavor = types.SimpleNamespace(
            ephemeral_gb=w.get("ephemeral_gb", 0), swap=w.get("swap_mb", 0))
        inst = types.SimpleNamespace(
            uuid=w["uuid"],
            name=w.get("name", "instance-%08x" % (i + 1)),
            host=conf.host,
            task_state=w.get("task_state"),
            vm_state=w.get("vm_state", "active"),
            image_ref=w.get("image_ref"),
            kernel_id=w.get("kernel_id"),
            ramdisk_id=w.get("ramdisk_id"),
            os_type=w.get("os_type"),
            flavor=flavor,
        )
        instances.append(inst)
        mine = []
        common_fields = dict(
            instance_uuid=inst.uuid, source_type="blank",
            destination_type="local", device_type="disk", disk_bus="virtio",
            boot_index=-1, delete_on_termination=True, no_device=False,
            encrypted=False, volume_id=None, snapshot_id=None, image_id=None,
            encryption_secret_uuid=None, encryption_format=None,
            encryption_options=None)
        if flavor.ephemeral_gb:
            mine.append(objects.BlockDeviceMapping(
                device_name="/dev/vdb", guest_format=None,
                volume_size=flavor.ephemeral_gb, **common_fields))
        if flavor.swap:
            mine.append(objects.BlockDeviceMapping(
                device_name="/dev/vdc", guest_format="swap",
                volume_size=flavor.swap, **common_fields))
        bdms[inst.uuid] = mine

    objects.BlockDeviceMappingList.bdms_by_instance_uuid = classmethod(
        lambda cls, context, uuids: {u: bdms.get(u, []) for u in uuids})
    nova.privsep.path.utime = lambda path: os.utime(path, None)

    base = os.path.join(instances_path, conf.image_cache.subdirectory_name)
    locks = os.path.join(instances_path, "locks")
    before, locks_before = files(base), files(locks)

    manager = imagecache.ImageCacheManager()
    manager.update(nova_context.get_admin_context(), instances)

    after, locks_after = files(base), files(locks)
    json.dump({
        "before": before,
        "after": after,
        "removed": sorted(set(before) - set(after)),
        "locks_before": locks_before,
        "locks_after": locks_after,
        "locks_removed": sorted(set(locks_before) - set(locks_after)),
        "active_base_files": sorted(os.path.basename(p) for p in manager.active_base_files),
        "used_swap_images": sorted(manager.used_swap_images),
        "used_ephemeral_images": sorted(manager.used_ephemeral_images),
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
