"""Helpers the bench/*.py scripts share: the machine description and the results writer."""
import json
import os
import platform
import re


def machine():
    """'<CPU model>, N CPUs visible, <OS> <release>' for the results files."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            if m:
                name = m.group(1).strip()
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs visible, {platform.system()} {platform.release()}"


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (first processor), sorted; [] if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:\s*(.*)$", f.read(), re.M)
    except OSError:
        return []
    return sorted(m.group(1).split()) if m else []


def save_merged(path, meta, new_cases):
    """Writes meta plus the cases to path, keeping earlier cases this run did not measure
    (a partial rerun replaces only its own); returns what was written."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("cases", [])
    names = {c["name"] for c in new_cases}
    cases = [c for c in old if c["name"] not in names] + new_cases
    result = dict(meta, cases=cases)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result
