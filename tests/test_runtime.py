"""Process settings: glibc malloc tuning is applied once, recorded by every stage, and can be turned off."""

import json
import os
import platform
import subprocess
import sys

CHECK = """
import json
from fsdfm.launch import runtime
before = runtime.malloc_tuned()
first = runtime.tune_malloc()
print(json.dumps({"before": before, "first": first, "again": runtime.tune_malloc(), "state": runtime.malloc_tuned()}))
"""


def _run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FSDFM_MALLOC_TUNING"}
    if env_value is not None:
        env["FSDFM_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_malloc_tuning_applies_once_on_glibc_and_can_be_turned_off():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert _run(None) == {"before": None, "first": glibc, "again": glibc, "state": glibc}
    assert _run("0") == {"before": None, "first": False, "again": False, "state": False}
