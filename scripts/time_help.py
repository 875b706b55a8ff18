"""Time `localrun --help` (target: 0.1 s or less). Usage: python scripts/time_help.py [RUNS]"""

import shutil
import statistics
import subprocess
import sys
import time

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
exe = shutil.which("localrun") or str(__import__("pathlib").Path(sys.executable).with_name("localrun"))
times = []
for _ in range(runs):
    start = time.perf_counter()
    subprocess.run([exe, "--help"], stdout=subprocess.DEVNULL, check=True)
    times.append(time.perf_counter() - start)
print(
    f"localrun --help: median {statistics.median(times) * 1000:.0f} ms, "
    f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {runs} runs"
)
