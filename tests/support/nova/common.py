"""Shared setup for the scripts that drive Nova's own code from the integration tests.

Imports Nova from the venv made by scripts/nova/install, parses an empty command line into
nova.conf's CONF (so every option has its default) and applies overrides given as
``group.name=value`` strings. Nova logs to stderr so a failing test shows what Nova did.
"""

import logging
import sys


def setup(instances_path, overrides=()):
    """Configures nova.conf in-process and returns CONF."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format="nova: %(levelname)s %(name)s: %(message)s")
    import nova.conf
    from nova import objects

    conf = nova.conf.CONF
    conf([], project="nova", default_config_files=[], default_config_dirs=[])
    objects.register_all()
    conf.set_override("instances_path", instances_path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit("override %r is not group.name=value" % item)
        group, _, name = key.rpartition(".")
        opts = conf._groups[group]._opts if group else conf._opts
        if name not in opts:
            raise SystemExit("unknown nova option %r" % key)
        # oslo.config converts the string with the option's own type.
        conf.set_override(name, opts[name]["opt"].type(value), group=group or None)
    return conf
