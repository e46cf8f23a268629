"""QuACK's autotuning log, GEMM by GEMM: its best configuration against the best of vlmoe's tile
candidates (`quack_gemm.CANDIDATES`) among the configurations it timed. CPU only; reads a log.

    QUACK_PRINT_AUTOTUNING=1 python benchmarks/moe_layer.py --ffn-only --headline --sonic \\
        --shape 3 --rounds 0 > sonic.log 2>&1
    python benchmarks/quack_autotune_log.py sonic.log

With QUACK_PRINT_AUTOTUNING=1, QuACK prints each configuration's time ("[config: GemmConfig(...)]
-> 1.234ms") and then the function's choice ("... for function NAME finished ...; best config
selected"). SonicMoE's GEMMs go through QuACK's autotuner, vlmoe's do not (they are timed by
vlmoe's own tuner among its candidates), so this shows what a wider search would buy at a shape
(NOTES.md session 16). SonicMoE's problems are not all vlmoe's: its backward uses the dgated
epilogue and gathers along K, where vlmoe gathers the rows first.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table
from vlmoe.moe.kernels.quack_gemm import CANDIDATES

TIMED = re.compile(r"\[config: GemmConfig\((?P<fields>.*)\)\] -> (?P<ms>[\d.]+|inf)ms")
CHOSEN = re.compile(r"autotuning for function (?P<name>\S+) finished")


def _tile(fields: str) -> tuple:
    """(tile_m, tile_n, cluster_m, cluster_n, pingpong, swap_ab) of a GemmConfig's repr."""
    values = dict(field.split("=", 1) for field in fields.split(", "))
    ints = [int(values[key]) for key in ("tile_m", "tile_n", "cluster_m", "cluster_n")]
    return (*ints, values["pingpong"] == "True", values.get("swap_ab") == "True")


def parse(text: str) -> list[tuple[str, dict[tuple, float]]]:
    """[(function name, {tile: ms})] in the order QuACK tuned them."""
    tuned, timed = [], {}
    for line in text.splitlines():
        if match := TIMED.search(line):
            timed[_tile(match["fields"])] = float(match["ms"])
        elif match := CHOSEN.search(line):
            tuned.append((match["name"], timed))
            timed = {}
    return tuned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("log", type=Path, help="output of a run with QUACK_PRINT_AUTOTUNING=1")
    args = parser.parse_args()
    ours = {tuple(tile[:5]) for tile in CANDIDATES}  # the swizzle is a launch argument
    rows = []
    for name, timed in parse(args.log.read_text()):
        finite = {tile: ms for tile, ms in timed.items() if ms != float("inf")}
        if not finite:
            continue
        best = min(finite, key=finite.get)
        mine = {tile: ms for tile, ms in finite.items() if tile[:5] in ours and not tile[5]}
        our_best = min(mine, key=mine.get) if mine else None
        rows.append(
            [
                name[:32],
                str(len(timed)),
                f"{best} {finite[best]:.3f}",
                f"{our_best} {mine[our_best]:.3f}" if our_best else "-",
                f"{mine[our_best] - finite[best]:.3f}" if our_best else "-",
            ]
        )
    header = ["function", "configs", "best (m, n, cm, cn, pingpong, swap_ab) ms", "vlmoe's best ms", "gap ms"]
    print_table("QuACK's autotuning against vlmoe's candidates", header, rows)


if __name__ == "__main__":
    main()
