"""The pictures of a routing analysis, each written as one PNG (matplotlib's Agg canvas, no pyplot,
so importing vlmoe never changes the global backend).

Every function takes `RoutingStats` (or parsed logs) and a path, and returns the path written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vlmoe.analysis.stats import IMAGE, TEXT, PatchMap, RoutingStats

TEXT_COLOR, IMAGE_COLOR = "#4c72b0", "#dd8452"
EXPERT_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _expert_colors(count: int) -> list[str]:
    return [EXPERT_COLORS[i % len(EXPERT_COLORS)] for i in range(count)]


def _expert_labels(stats: RoutingStats, layers: Sequence[str], count: int) -> list[str]:
    """Expert names for a shared expert axis when every layer on it names its experts alike
    (e.g. a connector's general/table/JSON/code), else the expert numbers."""
    named = {tuple(stats.expert_names.get(layer, ())) for layer in layers}
    if len(named) == 1 and len(next(iter(named))) == count:
        return list(next(iter(named)))
    return [str(e) for e in range(count)]


def _expert_axes(stats: RoutingStats) -> list[tuple[list[int], list[str]]]:
    """The layers (row numbers) split into heatmaps that can share one expert axis, with its labels.

    Layers that name their experts alike (a connector's general/table/JSON/code) get a heatmap of
    their own with those names; the other layers share one numbered axis.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, info in enumerate(stats.layers):
        names = tuple(stats.expert_names.get(info.name, ()))
        groups.setdefault(names if len(names) == info.num_experts else (), []).append(row)
    axes = []
    for names, rows in groups.items():
        count = max(stats.layers[row].num_experts for row in rows)
        axes.append((rows, list(names) or [str(e) for e in range(count)]))
    return axes


def _heatmap(
    axes,
    fractions: np.ndarray,
    row_labels: Sequence[str],
    title: str,
    column_labels: Sequence[str] | None = None,
) -> object:
    percent = 100 * fractions  # cells and colour bar in the same unit: % of the layer's slots
    image = axes.imshow(np.ma.masked_invalid(percent), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    labels = column_labels or [str(e) for e in range(percent.shape[1])]
    axes.set_xticks(range(percent.shape[1]), labels)
    axes.set_yticks(range(len(row_labels)), row_labels)
    axes.set_xlabel("expert")
    axes.set_title(title, fontsize=10)
    if percent.size <= 96:  # annotate small maps with their percentages
        for (row, col), value in np.ndenumerate(percent):
            if np.isfinite(value):
                color = "white" if value < 50 else "black"
                axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=color)
    return image


def _load_figure(
    stats: RoutingStats, panels: Sequence[tuple[str, tuple[str, str] | None]], columns: int = 1
) -> Figure:
    """Expert-load heatmaps, one panel per (title, sample group), `columns` panels a row.

    A panel stacks one heatmap per expert axis (`_expert_axes`), so named experts keep their names.
    """
    axes_groups = _expert_axes(stats)
    block, rows = len(axes_groups), -(-len(panels) // columns)
    longest = max(len(label) for _, labels in axes_groups for label in labels)
    experts = max(len(labels) for _, labels in axes_groups)
    width = 1.2 + columns * (0.4 + max(0.6, 0.2 + 0.075 * longest) * experts)
    figure = _figure(width, 0.6 + rows * (0.3 + 0.38 * len(stats.layers) + 0.45 * block))
    grid = figure.add_gridspec(rows * block, columns, height_ratios=[len(r) for r, _ in axes_groups] * rows)
    image = None
    for index, (title, group) in enumerate(panels):
        fractions = stats.load_fractions(group)
        first_row, column = (index // columns) * block, index % columns
        for offset, (layer_rows, labels) in enumerate(axes_groups):
            axes = figure.add_subplot(grid[first_row + offset, column])
            names = [stats.layers[row].label if column == 0 else "" for row in layer_rows]
            matrix = fractions[layer_rows][:, : len(labels)]
            image = _heatmap(axes, matrix, names, title if offset == 0 else "", labels)
    figure.colorbar(image, ax=figure.axes, fraction=0.05 / columns, label="% of slots")
    return figure


def expert_load_figure(stats: RoutingStats) -> Figure:
    """The heatmap of `plot_expert_load`, not yet saved (tests read its labels and colour bar)."""
    return _load_figure(stats, [("expert load (% of slots)", None)])


def plot_expert_load(stats: RoutingStats, path: Path) -> Path:
    """Heatmap of layers x experts: each layer's share of token-slots per expert (MoE-LLaVA fig. 6)."""
    return _save(expert_load_figure(stats), path)


def group_load_figure(stats: RoutingStats, kind: str, max_groups: int = 12) -> Figure:
    """The heatmaps of `plot_group_load`, not yet saved."""
    groups = stats.group_load.get(kind, {})
    if not groups:
        raise ValueError(f"no samples carry the tag {kind!r}; tags present: {sorted(stats.group_load)}")
    sizes = {value: sum(int(np.sum(c)) for c in layers.values()) for value, layers in groups.items()}
    values = sorted(groups, key=lambda value: (-sizes[value], value))[:max_groups]
    panels = [(f"{kind} = {value}", (kind, value)) for value in values]
    figure = _load_figure(stats, panels, columns=min(4, len(values)))
    figure.suptitle(f"expert load by {kind}", fontsize=11)
    return figure


def plot_group_load(stats: RoutingStats, kind: str, path: Path, max_groups: int = 12) -> Path:
    """One expert-load heatmap per value of a sample tag (domain, task, cluster), largest groups first."""
    return _save(group_load_figure(stats, kind, max_groups), path)


def plot_modality_split(stats: RoutingStats, path: Path) -> Path:
    """Per layer, each expert's share of text vs image token-slots (MoE-LLaVA fig. 7)."""
    layers = stats.layers
    figure = _figure(1.5 + 2.4 * len(layers), 2.8)
    for index, info in enumerate(layers):
        axes = figure.add_subplot(1, len(layers), index + 1)
        shares = stats.modality_shares(info.name)
        experts = np.arange(info.num_experts)
        axes.bar(experts, shares[TEXT], color=TEXT_COLOR, label="text")
        axes.bar(experts, shares[IMAGE], bottom=shares[TEXT], color=IMAGE_COLOR, label="image")
        axes.set_xticks(experts, _expert_labels(stats, [info.name], info.num_experts))
        axes.set_ylim(0, 1)
        axes.set_title(info.label, fontsize=10)
        axes.set_xlabel("expert")
        if index == 0:
            axes.set_ylabel("share of the expert's slots")
    figure.legend(
        handles=[Patch(color=TEXT_COLOR, label="text"), Patch(color=IMAGE_COLOR, label="image")],
        loc="upper right",
    )
    figure.suptitle("modality split per expert", fontsize=11)
    return _save(figure, path)


def plot_top_paths(stats: RoutingStats, path: Path, n: int = 10) -> Path:
    """The n most frequent top-1 expert paths across LM layers, text and image tokens stacked (fig. 8)."""
    top = stats.top_paths(n)
    if not top:
        raise ValueError("no top-1 paths were recorded (the model has no routed LM layer)")
    labels = [" → ".join(str(e) for e in route) for route, *_ in top][::-1]
    text = np.array([t for _, _, t, _ in top][::-1])
    image = np.array([i for _, _, _, i in top][::-1])
    figure = _figure(6.5, 0.8 + 0.32 * len(top))
    axes = figure.add_subplot()
    axes.barh(labels, text, color=TEXT_COLOR, label="text")
    axes.barh(labels, image, left=text, color=IMAGE_COLOR, label="image")
    axes.set_xlabel("tokens")
    axes.set_title(
        f"top-{len(top)} expert paths ({' → '.join(stats.layer(n).label for n in stats.path_layers)})"
    )
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_path_pca(stats: RoutingStats, path: Path, seed: int = 0) -> Path:
    """PCA of each token's one-hot top-1 path, coloured by text vs image token."""
    points = stats.path_pca(seed)
    if len(points) == 0:
        raise ValueError("no top-1 paths were recorded (the model has no routed LM layer)")
    figure = _figure(5.0, 4.2)
    axes = figure.add_subplot()
    # Integer paths put many tokens on one point: jitter a little so density shows.
    jitter = np.random.default_rng(seed).normal(scale=0.03, size=points.shape)
    for is_image, color, label in ((False, TEXT_COLOR, "text"), (True, IMAGE_COLOR, "image")):
        chosen = stats.path_is_image == is_image
        if chosen.any():
            moved = points[chosen] + jitter[chosen]
            axes.scatter(
                moved[:, 0], moved[:, 1], s=6, alpha=0.5, color=color, label=f"{label} ({chosen.sum()})"
            )
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.set_title("activation pathways (PCA of top-1 paths)")
    axes.legend(loc="best")
    return _save(figure, path)


def plot_patch_map(patch_map: PatchMap, expert_names: Sequence[str], path: Path) -> Path:
    """The connector's top-1 expert per patch, drawn over the input image (ChartMoE's patch map)."""
    rows, cols = patch_map.grid
    top1 = np.asarray(patch_map.top1).reshape(rows, cols)
    figure = _figure(5.5, 4.2)
    axes = figure.add_subplot()
    extent = (0, cols, rows, 0)
    image = _read_image(patch_map.image)
    if image is not None:
        axes.imshow(image, extent=extent)
    colors = _expert_colors(len(expert_names))
    norm = BoundaryNorm(np.arange(len(expert_names) + 1) - 0.5, len(expert_names))
    axes.imshow(
        top1, cmap=ListedColormap(colors), norm=norm, alpha=0.45 if image is not None else 1.0, extent=extent
    )
    if rows * cols <= 576:  # the expert number in each patch, readable up to 24 x 24
        for (row, col), expert in np.ndenumerate(top1):
            axes.text(col + 0.5, row + 0.5, str(expert), ha="center", va="center", fontsize=7, color="white")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"top-1 connector expert per patch: {patch_map.sample_id}", fontsize=10)
    axes.legend(
        # The patches show expert numbers, so a named expert's entry says its number too: "1 table".
        handles=[
            Patch(color=colors[i], label=name if name == f"expert {i}" else f"{i} {name}")
            for i, name in enumerate(expert_names)
        ],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    return _save(figure, path)


def plot_router_training(
    series: Mapping[str, Mapping[str, tuple[list[float], list[float]]]], path: Path
) -> Path:
    """One panel per router statistic over training steps, one line per layer."""
    if not series:
        raise ValueError("no router statistics in the logs (expected keys like aux/<layer>/load_balance)")
    metrics = sorted(series)
    figure = _figure(4.2 * len(metrics), 3.2)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        for layer, (steps, values) in sorted(series[metric].items()):
            axes.plot(steps, values, label=_short(layer), linewidth=1.2)
        # expert_load_entropy's unit; a tokens-per-expert list is turned into it (logs.router_series).
        axes.set_title(f"{metric} (nats)" if metric == "load_entropy" else metric, fontsize=10)
        axes.set_xlabel("step")
        if len(series[metric]) <= 12:
            axes.legend(fontsize=7)
    figure.suptitle("router statistics over training", fontsize=11)
    return _save(figure, path)


def _short(layer: str) -> str:
    parts = layer.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return layer


def _read_image(path: str) -> np.ndarray | None:
    if not path or not Path(path).is_file():
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError):
        return None
