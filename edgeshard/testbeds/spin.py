"""A fixed CPU-bound loop, run as an emulated device by emulated.measure_compute (edgeshard/testbeds/emulated.py)
as ``python -I -S spin.py <iterations>``: prints {"wall": s, "cpu": s} of the loop alone (start-up excluded), so
wall / cpu is the slowdown the device's CPU quota imposes. A separate process: it must run inside the device's
cgroups, which only a process started through edgeshard/testbeds/trampoline.py is.
"""

import json
import sys
import time

if __name__ == "__main__":
    # At module level on purpose: global-variable loads make an iteration ~70 ns, so 3M iterations are the ~0.2 s
    # of CPU that tests/test_emulate.py and bench/emulate_accuracy.py size their runs by (inside a function,
    # with fast locals, the same count takes half that).
    n = int(sys.argv[1])
    t, c = time.perf_counter(), time.process_time()
    x = 0
    for i in range(n):
        x += i * i
    print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}), flush=True)
