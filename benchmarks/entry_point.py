"""The plugin's entry point on a GPU machine, where the package is imported from the checkout ($PWD on
PYTHONPATH), not installed: vLLM finds general plugins through entry points only, so this writes a bare
dist-info into a site directory, read from setup.cfg.

    python3 -m benchmarks.entry_point /tmp/site
"""
from __future__ import annotations

import configparser
import importlib.metadata as md
import os
import sys


def write_entry_point(site: str, setup_cfg: str = "setup.cfg") -> None:
    c = configparser.ConfigParser(interpolation=None)
    c.read(setup_cfg)
    d = os.path.join(site, f"vllm_kvrunahead-{c['metadata']['version']}.dist-info")
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/METADATA", "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {c['metadata']['name']}\nVersion: {c['metadata']['version']}\n")
    with open(f"{d}/entry_points.txt", "w") as f:
        for group, val in c["options.entry_points"].items():
            f.write(f"[{group}]\n" + "\n".join(x.strip() for x in val.strip().splitlines()) + "\n\n")
    print("plugin entry points:", [(e.name, e.value) for e in md.entry_points(group="vllm.general_plugins")])


if __name__ == "__main__":
    write_entry_point(sys.argv[1])
