"""CPU-bound steps after idle gaps: what a device does in sequential mode (a token step, then waiting for the
others). Run as an emulated device as ``python steps.py <step CPU s> <steps> <gap s>``; prints the JSON list of
each step's slowdown, wall / CPU time (tests/test_emulate.py, bench/emulate_accuracy.py: with the idle ballast
of edgeshard/testbeds/ballast.py it should be 1 / cpu_share). emulated.STEP_SCRIPT is this file's text, for
callers that run it with ``python -c``.
"""

import json
import sys
import time


def main(op: float, n: int, gap: float) -> None:
    out = []
    for _ in range(n):
        time.sleep(gap)
        t, c = time.perf_counter(), time.process_time()
        while time.process_time() - c < op:
            pass
        out.append((time.perf_counter() - t) / op)
    print(json.dumps(out))


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
