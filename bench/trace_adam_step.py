"""The instructions of one 8-bit Adam step (`pq_adam_step` on one float32 tensor, the library pyquant loads, its
ISA as PYQUANT_CPU_ISA picks), counted by single-stepping under bench/micro/trace_instructions.c:

    gcc -O2 -o /tmp/trace_instructions bench/micro/trace_instructions.c
    OMP_NUM_THREADS=1 /tmp/trace_instructions /tmp/addresses.txt python bench/trace_adam_step.py /tmp/addresses.txt [NUMEL]

Prints the instructions per parameter inside the library's functions that execute the most, and the mnemonics of
the block kernels (`adam_block`, `adam_blocks`), per parameter. NUMEL (default 1024: four blocks) stays small:
single-stepping runs about 10^5 times slower than the kernel."""

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_libs  # noqa: E402
from pyquant.backends import capi  # noqa: E402
from pyquant.backends.code_tables import cached_code_table  # noqa: E402
from pyquant.functional import create_dynamic_map  # noqa: E402


def traced() -> bool:
    return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in open("/proc/self/status"))


def main() -> None:
    addresses, numel = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    if not traced():
        raise SystemExit("run under bench/micro/trace_instructions (see the docstring): the marks would stop it")
    lib = capi.cpu_library()
    path = os.path.realpath(lib._name)
    code1, code2 = create_dynamic_map(True), create_dynamic_map(False)
    tables = (code1.data_ptr(), code2.data_ptr(), cached_code_table(code1).data_ptr(), cached_code_table(code2).data_ptr())
    data = compare_libs.operands(numel)
    descriptor = compare_libs.descriptor(data)
    for _ in range(3):  # states away from their zero start
        lib.pq_adam_step(ctypes.byref(descriptor), 1, *tables, 0)
    os.kill(os.getpid(), signal.SIGSTOP)  # the tracer starts stepping
    status = lib.pq_adam_step(ctypes.byref(descriptor), 1, *tables, 0)
    os.kill(os.getpid(), signal.SIGSTOP)  # and stops
    if status < 0:
        raise SystemExit("pq_adam_step refused the call")
    base = min(int(line.split("-")[0], 16) for line in open("/proc/self/maps") if line.rstrip().endswith(path))
    steps = [int(line, 16) - base for line in open(addresses)]
    function, mnemonic, name = {}, {}, "?"
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            name = m.group(1)
        elif m := re.match(r"^\s+([0-9a-f]+):\s+(\S+)", line):
            function[int(m.group(1), 16)], mnemonic[int(m.group(1), 16)] = name, m.group(2)
    inside = [a for a in steps if a in function]
    print(f"{len(steps)} instructions stepped, {len(inside)} in {os.path.basename(path)}, {numel} parameters")
    for name, count in collections.Counter(function[a] for a in inside).most_common(6):
        print(f"{count / numel:8.2f} a parameter  {name[:110]}")
    kernel = [a for a in inside if re.search(r"adam_blocks?_8bit", function[a])]
    print(f"block kernels: {len(kernel) / numel:.2f} instructions a parameter; by mnemonic:")
    for op, count in collections.Counter(mnemonic[a] for a in kernel).most_common():
        if count / numel >= 0.001:
            print(f"{count / numel:8.3f}  {op}")


if __name__ == "__main__":
    main()
