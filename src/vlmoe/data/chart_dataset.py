"""Generate a synthetic chart data set on disk: sharded, resumable, deterministic, in parallel.

Layout under `out`:
    manifest.json                       seed, size, shard size, questions per chart it was made with
    shard_00000/images/00000000.png     one PNG per chart
    shard_00000/records.jsonl           per chart: type, table, JSON, code, QA with PoT programs
    shard_00000/conversations.jsonl     LLaVA samples (image paths relative to the shard)
    shard_00000/done.json               written last: the shard is complete

Chart `i` depends only on (seed, i), so workers, interruptions and shard boundaries never change
the output. A re-run skips complete shards and, in a partial one, re-draws only missing images;
a larger n extends the set, a smaller one is refused (it would leave images without records).
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from vlmoe.data.chart_code import plotting_code
from vlmoe.data.chart_conversations import chart_samples
from vlmoe.data.chart_qa import chart_questions
from vlmoe.data.chart_record import sample_chart_record
from vlmoe.data.chart_render import MAX_SIZE_PX, MIN_SIZE_PX, ChartRenderer
from vlmoe.data.chart_text import chart_json_text, chart_table
from vlmoe.data.folders import output_folder

SHARD_SIZE = 1000
CHUNK_SIZE = 20  # charts per worker task: big enough to amortise IPC, small for a smooth progress bar
YOUNG_GC_THRESHOLD = 20_000  # allocations between young collections while generating (Python: 700)


@dataclass(frozen=True)
class ChartSetConfig:
    n: int
    seed: int = 0
    size_px: int = 336
    shard_size: int = SHARD_SIZE
    questions_per_chart: int = 4


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed run never leaves a half-written file under the final name


def chart_entry(config: ChartSetConfig, index: int) -> tuple[dict, list[dict]]:
    """The record line and the conversation samples of chart `index` (no rendering).

    >>> record, samples = chart_entry(ChartSetConfig(n=1), 0)
    >>> record["image"], len(samples) >= 3
    ('images/00000000.png', True)
    """
    record = sample_chart_record(config.seed, index)
    questions = chart_questions(
        record, np.random.default_rng([config.seed, index, 1]), config.questions_per_chart
    )
    image = f"images/{index:08d}.png"
    table, json_text, code = (
        chart_table(record),
        chart_json_text(record),
        plotting_code(record, config.size_px),
    )
    line = {
        "id": record.chart_id,
        "image": image,
        "chart_type": record.chart_type,
        "table": table,
        "json": json_text,
        "code": code,
        "qa": [asdict(q) for q in questions],
    }
    rng = np.random.default_rng([config.seed, index, 2])
    return line, chart_samples(record.chart_id, image, table, json_text, code, questions, rng)


_renderer: ChartRenderer | None = None  # one per process: it keeps its figures between charts


def _renderer_for(size_px: int) -> ChartRenderer:
    global _renderer
    if _renderer is None or _renderer.size_px != size_px:
        _renderer = ChartRenderer(size_px)
    return _renderer


def _render_chunk(args: tuple[ChartSetConfig, Path, list[int]]) -> int:
    config, shard_dir, indices = args
    renderer = _renderer_for(config.size_px)
    for index in indices:
        path = shard_dir / "images" / f"{index:08d}.png"
        if not path.exists():
            _atomic_write(path, renderer.render_png(sample_chart_record(config.seed, index)))
    return len(indices)


def _manifest(config: ChartSetConfig) -> dict[str, int]:
    return {
        "seed": config.seed,
        "size_px": config.size_px,
        "shard_size": config.shard_size,
        "questions_per_chart": config.questions_per_chart,
    }


def _check_manifest(out: Path, config: ChartSetConfig) -> None:
    """Refuse to resume a directory made with another seed, size, shard size or number of questions
    per chart (writes nothing)."""
    path = out / "manifest.json"
    if not path.exists():
        return
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        raise ValueError(
            f"{path} is not the JSON manifest of a chart set; write to a new --out directory"
        ) from None
    options = {
        "seed": "--seed",
        "size_px": "--size",
        "shard_size": "--shard-size",
        "questions_per_chart": "questions_per_chart",
    }
    for key, value in _manifest(config).items():
        # questions_per_chart came later: a manifest without it says nothing about it
        default = value if key == "questions_per_chart" else None
        if not isinstance(found, dict) or found.get(key, default) != value:
            was = found.get(key) if isinstance(found, dict) else None
            raise ValueError(
                f"{path}: {key} is {was!r} but this run asks for {value!r}; "
                f"resume with the same {options[key]}, or write to a new --out directory"
            )


def charts_held(out: str | Path) -> int:
    """How many charts `out` already holds: one past the highest chart number of any shard's
    done.json or image (an interrupted run counts the images it drew).

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> charts_held(out), charts_held(generate_chart_set(out, ChartSetConfig(n=2, size_px=96))[0].parent)
    (0, 2)
    """
    held = 0
    for shard_dir in Path(out).glob("shard_*"):
        done = shard_dir / "done.json"
        if done.is_file():
            try:
                info = json.loads(done.read_text())
                held = max(held, int(info["first"]) + int(info["count"]))
            except (ValueError, KeyError, TypeError):
                pass  # a damaged done.json: the shard is redrawn, its images still count below
        if (shard_dir / "images").is_dir():
            for entry in os.scandir(shard_dir / "images"):
                number = entry.name.removesuffix(".png")
                if entry.name.endswith(".png") and number.isdigit():
                    held = max(held, int(number) + 1)
    return held


def chart_set_shards(folder: str | Path) -> list[Path]:
    """The complete shards of a chart set on disk, in chart order; [] when `folder` is not one
    (it has no manifest.json). An unfinished shard is an error: its conversations are not written.

    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> _ = generate_chart_set(out, ChartSetConfig(n=3, size_px=96, shard_size=2))
    >>> [shard.name for shard in chart_set_shards(out)], chart_set_shards(Path(out) / "shard_00000")
    (['shard_00000', 'shard_00001'], [])
    """
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        return []
    shards = sorted(path for path in folder.glob("shard_*") if path.is_dir())
    for shard in shards:
        if not (shard / "done.json").is_file() or not (shard / "conversations.jsonl").is_file():
            raise ValueError(
                f"chart set {folder}: {shard.name} is unfinished (no done.json); finish it by running "
                f"`vlmoe data charts --out {folder}` again with the options it was made with"
            )
    return shards


def _check_whole_number(value: object, option: str, low: int, high: int | None = None) -> None:
    valid = f"between {low} and {high}" if high is not None else f"at least {low}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{option} must be a whole number {valid}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{option} must be {valid}, got {value}")


def check_chart_set(out: str | Path, config: ChartSetConfig, workers: int = 1) -> Path:
    """Refuse, before anything is written, a run that cannot finish or would damage `out`.

    Checks every setting's type and range, that `out` is a folder, that it was made with the same
    seed, size and shard size, and that it holds no more than `config.n` charts: a smaller --n
    would leave more images than records, so it is refused rather than truncating the set.

    >>> check_chart_set("charts", ChartSetConfig(n=10, shard_size=0))
    Traceback (most recent call last):
    ...
    ValueError: --shard-size must be at least 1, got 0
    """
    _check_whole_number(config.n, "--n", 1)
    _check_whole_number(config.seed, "--seed", 0)
    _check_whole_number(config.size_px, "--size", MIN_SIZE_PX, MAX_SIZE_PX)
    _check_whole_number(config.shard_size, "--shard-size", 1)
    _check_whole_number(config.questions_per_chart, "questions_per_chart", 0)  # 0: no QA, tables etc. only
    _check_whole_number(workers, "--workers", 1)
    out = output_folder(out)
    _check_manifest(out, config)
    held = charts_held(out)
    if held > config.n:
        raise ValueError(
            f"{out} already holds {held} charts but this run asks for --n {config.n}; a smaller set would "
            f"leave images without records. Pass --n {held} or more to resume or extend it, or another "
            "--out for a new set"
        )
    return out


def _shard_done(shard_dir: Path, count: int) -> bool:
    done = shard_dir / "done.json"
    if not done.is_file():
        return False
    try:
        info = json.loads(done.read_text())
    except ValueError:  # damaged (not JSON, not UTF-8): the shard is redrawn, as charts_held says
        return False
    return isinstance(info, dict) and info.get("count") == count


def _chunks(indices: range) -> Iterator[list[int]]:
    for start in range(0, len(indices), CHUNK_SIZE):
        yield list(indices[start : start + CHUNK_SIZE])


def generate_chart_set(
    out: str | Path,
    config: ChartSetConfig,
    workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write `config.n` charts under `out` and return the shard directories.

    `on_progress(k)` is called as k more charts are finished (complete shards count at once).

    >>> import tempfile
    >>> shards = generate_chart_set(tempfile.mkdtemp(), ChartSetConfig(n=3, size_px=128))
    >>> sorted(p.name for p in (shards[0] / "images").iterdir())
    ['00000000.png', '00000001.png', '00000002.png']
    """
    out = check_chart_set(out, config, workers)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").exists():
        _atomic_write(out / "manifest.json", json.dumps(_manifest(config), indent=2).encode())
    progress = on_progress or (lambda k: None)
    shard_dirs = []
    # Draw one chart before forking: workers inherit loaded fonts and figures instead of
    # each paying for them (a second per worker, 10% of a 500-chart run).
    _renderer_for(config.size_px).render_png(sample_chart_record(config.seed, 0))
    # A chart leaves ~20k objects in reference cycles, so the collector runs every few ms. Frozen,
    # the long-lived ones (modules, fonts, figures) are never traced again, and forked workers
    # keep sharing their pages instead of copying them as the collector touches them. A young
    # generation of ~6 charts (not 700 objects) lets a dead Axes be freed before it is promoted
    # and traced again. Together: gc ~6 -> ~3 ms per chart, ~15 MB more memory per process.
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *thresholds[1:])
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for first in range(0, config.n, config.shard_size):
            indices = range(first, min(first + config.shard_size, config.n))
            shard_dir = out / f"shard_{first // config.shard_size:05d}"
            shard_dirs.append(shard_dir)
            if _shard_done(shard_dir, len(indices)):
                progress(len(indices))
                continue
            # A done.json of fewer charts (a smaller --n before) would make this shard read as done
            # while its files are rewritten; done.json comes back last, once they all are.
            (shard_dir / "done.json").unlink(missing_ok=True)
            (shard_dir / "images").mkdir(parents=True, exist_ok=True)
            tasks = [(config, shard_dir, chunk) for chunk in _chunks(indices)]
            finished = pool.imap_unordered(_render_chunk, tasks) if pool else map(_render_chunk, tasks)
            records, samples = [], []
            for index in indices:  # while the workers draw (with no pool, before drawing)
                line, chart_conversations = chart_entry(config, index)
                records.append(json.dumps(line, ensure_ascii=False))
                samples += [json.dumps(s, ensure_ascii=False) for s in chart_conversations]
            for count in finished:
                progress(count)
            _atomic_write(shard_dir / "records.jsonl", ("\n".join(records) + "\n").encode())
            _atomic_write(shard_dir / "conversations.jsonl", ("\n".join(samples) + "\n").encode())
            _atomic_write(
                shard_dir / "done.json", json.dumps({"count": len(indices), "first": first}).encode()
            )
    finally:
        if pool:
            pool.close()
            pool.join()
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return shard_dirs
