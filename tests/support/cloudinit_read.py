"""Reads a config drive with cloud-init's own code and prints what it found as JSON.

usage: cloudinit_read.py tree DIR      ConfigDriveReader(DIR).read_v2() on an extracted tree
       cloudinit_read.py device DEV    DataSourceConfigDrive.find_candidate_devs() must list
                                       DEV (prints {"candidates": [...]})
Bytes are printed as {"b64": ...}.
"""
import base64
import json
import sys

from cloudinit.sources import DataSourceConfigDrive as ds
from cloudinit.sources.helpers import openstack


def enc(v):
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, dict):
        return {k: enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [enc(x) for x in v]
    return v


mode, arg = sys.argv[1], sys.argv[2]
if mode == "tree":
    result = openstack.ConfigDriveReader(arg).read_v2()
else:
    devs = ds.find_candidate_devs(probe_optical=False)
    if arg not in devs:
        sys.exit(f"{arg} is not among the candidate devices {devs}")
    result = {"candidates": devs}
print(json.dumps(enc(result)))
