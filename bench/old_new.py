"""Two einattn binaries on the same kernels, interleaved in one device call: the shapes of
bench/softmax_compare.py (attention_mha / attention_causal, bf16, B*N = 16384, H*d = 2048)
and bench/lightning_compare.py (lightning, B=4 H=16 d=128, BLOCK=64, sm_90a), each
`einattn bench --format json` run ROUNDS times per binary in A B A B order; the best median
per binary and their ratio. Proves a refactor kept the kernels' speed.
Writes $OUT/old_new.json and $OUT/old_new.md.
Usage: python3 bench/old_new.py OLD_BIN NEW_BIN [ROUNDS]
"""
import datetime
import json
import os
import subprocess
import sys

OUT = os.environ.get("OUT", "/tmp")
old, new = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3


def configs():
    for d in (128, 64):
        H = 2048 // d
        for n in (4096, 16384):
            B = 16384 // n
            for causal in (False, True):
                ex = "examples/attention_causal.ein" if causal else "examples/attention_mha.ein"
                yield (f"softmax d={d} N={n} {'causal' if causal else 'full'}",
                       [ex, "-D", f"B={B}", "-D", f"H={H}", "-D", f"N={n}", "-D", f"D={d}",
                        "-D", "TILE=64", "--reps", "100"])
    for n in (8192, 32768, 65536):
        yield (f"lightning N={n}",
               ["examples/lightning.ein", "-D", "B=4", "-D", "H=16", "-D", f"N={n}", "-D", "D=128",
                "-D", "BLOCK=64", "--dtype", "bf16", "--target", "sm_90a", "--reps", "50"])


def median_ms(binary, args):
    r = subprocess.run([binary, "bench", *args, "--format", "json"], capture_output=True, text=True)
    if r.returncode != 0:
        print("failed:", binary, " ".join(args), r.stderr[-400:], flush=True)
        return None
    return json.loads(r.stdout)["median_ms"]


rows = []
for name, args in configs():
    times = {"old": [], "new": []}
    for _ in range(ROUNDS):
        for which, binary in (("old", old), ("new", new)):
            t = median_ms(binary, args)
            if t is not None:
                times[which].append(t)
    row = {"config": name, "args": " ".join(args),
           "old_ms": min(times["old"], default=None), "new_ms": min(times["new"], default=None)}
    if row["old_ms"] and row["new_ms"]:
        row["new_over_old"] = round(row["new_ms"] / row["old_ms"], 4)
    rows.append(row)
    print(row, flush=True)

env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
       "command": " ".join(["python3", "bench/old_new.py", *sys.argv[1:]])}
with open(os.path.join(OUT, "old_new.json"), "w") as f:
    json.dump({"env": env, "rows": rows}, f, indent=1)
lines = [f"{env['date']}: `{env['command']}`", "", "| config | old ms | new ms | new/old |",
         "|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['config']} | {r['old_ms']} | {r['new_ms']} | {r.get('new_over_old')} |")
with open(os.path.join(OUT, "old_new.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
