"""`write_report`: every picture of a routing analysis as PNGs plus one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlmoe.analysis import plots
from vlmoe.analysis.ablation import read_ablation
from vlmoe.analysis.logs import read_log_history, router_series
from vlmoe.analysis.stats import RoutingStats
from vlmoe.atomic import write_atomically

REPORT_NAME = "report.html"


def write_report(
    stats: RoutingStats,
    out_dir: str | Path,
    *,
    logs: str | Path | None = None,
    eval_dir: str | Path | None = None,
    title: str = "vlmoe routing analysis",
    model: str | None = None,
    data: str | None = None,
    settings: Mapping[str, Any] | None = None,
    num_paths: int = 10,
) -> Path:
    """Write the statistics, the PNGs and `report.html` (PNGs embedded) into `out_dir`; returns the HTML path.

    `logs`: trainer logs with `aux/<layer>/<statistic>` scalars (router statistics over training);
    `eval_dir`: `vlmoe eval` results, routed and with `--force-expert i` (ablation table).
    `model`, `data` and `settings` name what was analysed in the report (on top of `stats.meta`).
    Sections without data are listed in the report as skipped, with the reason.

    Example:
        >>> import tempfile, numpy as np
        >>> from vlmoe.analysis.stats import LayerInfo
        >>> stats = RoutingStats(layers=[LayerInfo("lm.layers.0.mlp", "lm", 2, 1)],
        ...                      load={"lm.layers.0.mlp": np.array([3, 1])},
        ...                      modality_load={"lm.layers.0.mlp": np.array([[2, 1], [1, 0]])})
        >>> path = write_report(stats, tempfile.mkdtemp(), model="runs/moe-llava", data="eval.json")
        >>> path.name, "data:image/png;base64," in path.read_text(), "runs/moe-llava" in path.read_text()
        ('report.html', True, True)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, list[Path], str]] = []  # (title, caption, pngs, extra html)
    skipped: list[str] = []

    def draw(section: str, caption: str, make, *names: str) -> list[Path]:
        try:
            pngs = make()
        except (ValueError, FileNotFoundError) as error:
            skipped.append(f"{section}: {error}")
            return []
        sections.append((section, caption, pngs, ""))
        return pngs

    for info in stats.layers:
        if not stats.load.get(info.name, np.zeros(0)).sum():
            why = "no sample had an image" if info.kind == "connector" else "no batch reached it"
            skipped.append(f"{info.label}: no token was routed through it ({why}); its heatmap row is blank")
    if stats.layers:
        draw(
            "Expert load",
            "Share of each layer's token-slots (all top-k choices, padding excluded) sent to each expert.",
            lambda: [plots.plot_expert_load(stats, out_dir / "expert_load.png")],
        )
        for kind in sorted(stats.group_load):
            draw(
                f"Expert load by {kind}",
                f"As above, for the samples of each {html.escape(kind)} (at most the 12 largest groups).",
                lambda kind=kind: [
                    plots.plot_group_load(stats, kind, out_dir / f"expert_load_by_{kind}.png")
                ],
            )
        draw(
            "Modality split",
            "For each expert, the share of its token-slots that came from text and from image tokens "
            "(connector tokens are all image patches).",
            lambda: [plots.plot_modality_split(stats, out_dir / "modality_split.png")],
        )
    else:
        skipped.append("routing plots: the statistics hold no routed layer")
    draw(
        "Activation pathways",
        f"The {num_paths} most frequent top-1 expert paths through the LM's sparse layers, and a PCA "
        "of every recorded token's one-hot path, coloured by text vs image token.",
        lambda: [
            plots.plot_top_paths(stats, out_dir / "top_paths.png", num_paths),
            plots.plot_path_pca(stats, out_dir / "path_pca.png"),
        ],
    )
    connector = next((info.name for info in stats.layers if info.kind == "connector"), None)
    if connector is not None and stats.patch_maps:
        names = stats.names_of_experts(connector)
        draw(
            "Per-patch connector experts",
            "The MoE connector's top-1 expert for each image patch, over the input image.",
            lambda: [
                plots.plot_patch_map(patch_map, names, out_dir / f"patch_map_{index}.png")
                for index, patch_map in enumerate(stats.patch_maps)
            ],
        )
    elif connector is not None and stats.load.get(connector, np.zeros(0)).sum():
        skipped.append(
            "per-patch map: no image's patch grid was known (LLaVA-NeXT/Idefics3 tiles are not drawn)"
        )
    if logs is not None:
        draw(
            "Router statistics over training",
            "Per-layer router scalars logged as aux/&lt;layer&gt;/&lt;statistic&gt; in "
            f"{html.escape(str(logs))}.",
            lambda: [
                plots.plot_router_training(
                    router_series(read_log_history(logs)), out_dir / "router_training.png"
                )
            ],
        )
    if eval_dir is not None:
        try:
            table = read_ablation(eval_dir)
            if not table.rows:
                raise ValueError(f"no summary.json with metrics under {eval_dir}")
            names = stats.names_of_experts(connector) if connector is not None else None
            caption = "Scores (%) with routing and with every token forced to one expert; best in bold."
            sections.append(("Forced-expert ablation", caption, [], table.to_html(names)))
        except (ValueError, FileNotFoundError) as error:
            skipped.append(f"forced-expert ablation: {error}")

    described = {**stats.meta, **dict(settings or {})}
    described.update({key: value for key, value in (("model", model), ("data", data)) if value is not None})
    page = _page(title, stats, described, sections, skipped, logs, eval_dir)
    # The statistics, then the page last: an interrupted rerun leaves the earlier page whole.
    stats.save(out_dir)
    path = out_dir / REPORT_NAME
    write_atomically(path, lambda temp: temp.write_text(page, encoding="utf-8"))
    return path


def _settings_rows(
    stats: RoutingStats, described: Mapping[str, Any], logs: Any, eval_dir: Any
) -> list[tuple[str, str]]:
    meta = dict(described)
    rows = [(key, meta.pop(key, "(not recorded)")) for key in ("model", "data")]
    rows += sorted(meta.items())
    rows.append(
        (
            "routed layers",
            ", ".join(f"{i.label} ({i.num_experts} experts, top-{i.top_k})" for i in stats.layers),
        )
    )
    for layer, names in stats.expert_names.items():
        rows.append((f"experts of {stats.layer(layer).label}", ", ".join(names)))
    if logs is not None:
        rows.append(("training logs", str(logs)))
    if eval_dir is not None:
        rows.append(("evaluation results", str(eval_dir)))
    return [(str(k), v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in rows]


def _page(
    title: str,
    stats: RoutingStats,
    described: Mapping[str, Any],
    sections: list[tuple[str, str, list[Path], str]],
    skipped: list[str],
    logs: Any,
    eval_dir: Any,
) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%;display:block;margin:0.5em 0}.skip{color:#777}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Model, data and settings</h2><table>",
        *(
            f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
            for k, v in _settings_rows(stats, described, logs, eval_dir)
        ),
        "</table>",
    ]
    for section, caption, pngs, extra in sections:
        parts.append(f"<h2>{esc(section)}</h2><p>{caption}</p>")
        for png in pngs:
            encoded = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{esc(png.name)}' src='data:image/png;base64,{encoded}'>")
        parts.append(extra)
    if skipped:
        parts.append("<h2>Skipped</h2><ul class='skip'>")
        parts += [f"<li>{esc(reason)}</li>" for reason in skipped]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
