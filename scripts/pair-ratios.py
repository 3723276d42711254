"""Ratios of the JSON rows that scripts/bench-bf16.sh and scripts/bench-sdxl.sh print with PAIRS=N:
each of our rows is paired with the peer's row that follows it, and the pair's ratio (ours over
the peer's) is printed for the medians and for the fastest steps, one JSON line per pair.

    python3 scripts/pair-ratios.py < rows.jsonl
"""
import json
import sys


def times(row):
    """(median, fastest) seconds of a row of ours or of the peer's (its row is under "row")."""
    if row.get("peer"):
        r = row["row"]
        if "median_cfg_step_s" in r:
            return r["median_cfg_step_s"], r["min_cfg_step_s"]
        return r["median_step_s"], r["min_step_s"]
    return row["median_s"], row["min_s"]


def main():
    rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
    ours = None
    for row in rows:
        if "cpu_flags" in row:
            continue
        if not row.get("peer"):
            ours = row
            continue
        if ours is None:
            continue
        (om, of), (pm, pf) = times(ours), times(row)
        print(json.dumps({
            "work": ours["mode"] + ("" if ours["mode"] != "train" else " " + ours["method"]),
            "peer_mode": row["row"].get("mode", "cfg-step"),
            "ours_median_s": om, "peer_median_s": pm, "median_ratio": round(om / pm, 3),
            "ours_min_s": of, "peer_min_s": pf, "min_ratio": round(of / pf, 3),
        }))
        ours = None


main()
