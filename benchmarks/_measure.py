"""Shared by the benchmarks that run builds in fresh processes (bench_resume, bench_validate_peak)."""

from __future__ import annotations

import os
from typing import Dict, Optional

# Opening of a child script: `status(key)` reads /proc/self/status, `base` is the resident set at
# start, and the peak (VmHWM) is reset to it, so status('VmHWM:') - base is the peak the work adds.
PEAK_PREAMBLE = r"""
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
base = status('VmRSS:')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the peak (VmHWM) to the current resident set
"""


def build_env(package_dir: Optional[str]) -> Dict[str, str]:
    """The environment of a child that imports arrow_quant_v2 from package_dir (another build,
    installed with pip --target) instead of this one; None: this build."""
    env = dict(os.environ)
    if package_dir:
        import pyarrow
        env["PYTHONPATH"] = package_dir
        # an installed-elsewhere build finds pyarrow's libarrow through the environment
        env["LD_LIBRARY_PATH"] = pyarrow.get_library_dirs()[0]
    return env
