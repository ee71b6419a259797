"""Kernel time by kernel name from an `ncu --csv --metrics gpu__time_duration.sum` log:
total ms, launches and share, largest first; plus the share of matrix-product kernels
(names with gemm/matmul/mma/cutlass/sm90/xmma). Usage: python3 ncu_summary.py LOG [TOP]"""
import csv
import re
import sys
from collections import defaultdict

path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25
lines = open(path, errors="replace").read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
total, count = defaultdict(float), defaultdict(int)
for row in csv.DictReader(lines[start:]):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    value = float(row["Metric Value"].replace(",", ""))
    unit = row.get("Metric Unit", "ns")
    ms = value * {"ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}.get(unit, 1e-6)
    name = re.sub(r"\(.*", "", row["Kernel Name"])[:90]
    total[name] += ms
    count[name] += 1
all_ms = sum(total.values())
matmul = sum(v for k, v in total.items() if re.search(r"gemm|matmul|mma|cutlass|sm90|xmma", k, re.I))
print(f"kernels {sum(count.values())}  total {all_ms:.1f} ms  matmul-like {matmul:.1f} ms ({100 * matmul / max(all_ms, 1e-9):.0f} %)")
for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{ms:9.2f} ms {100 * ms / all_ms:5.1f} % {count[name]:6d}x  {name}")
