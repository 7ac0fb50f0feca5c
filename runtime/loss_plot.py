"""The loss curve of a run (`loss.png`): training loss per stage, the held-out loss beside it."""

from __future__ import annotations

import io
from pathlib import Path

from runtime.contract.metrics import read_eval_losses, read_metrics
from runtime.contract.files import write_atomic

_MIN_POINTS_TO_SMOOTH = 8


def _smoothed(values: list[float]) -> list[float]:
    """Centred moving average over about 1/20 of the points (at least 3), narrower at the ends:
    unlike an exponential average it does not lag behind a falling loss."""
    half = max(1, len(values) // 40)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss against step, one colour per stage, later stages continuing where earlier ones ended;
    the logged points with a lightly smoothed line over them (from 8 points on), and the held-out
    loss during training (`eval_every_steps`) dashed in the same colour. Returns None and
    writes nothing when no loss was logged. The PNG carries no software version or time, so the
    same metrics give the same bytes."""
    metrics = read_metrics(Path(metrics_path))
    evals = read_eval_losses(Path(metrics_path))
    if not metrics:
        return None
    # Imported here so that reading or building a report does not load matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offset = 0
    for i, (stage, records) in enumerate(metrics.items()):
        steps = [offset + r.step for r in records]
        losses = [float(r.loss) for r in records]
        color = f"C{i % 10}"
        if len(losses) >= _MIN_POINTS_TO_SMOOTH:
            ax.plot(steps, losses, color=color, alpha=0.35, linewidth=0.8, marker="o", markersize=2.5)
            ax.plot(steps, _smoothed(losses), color=color, linewidth=2.0, label=stage)
        else:  # a smoothed line over a handful of points would only lag behind them
            ax.plot(steps, losses, color=color, linewidth=1.5, marker="o", markersize=4, label=stage)
        held = evals.get(stage, [])
        if held:  # the held-out loss during training, in the stage's colour
            ax.plot([offset + step for step, _ in held], [loss for _, loss in held], color=color, linestyle="--",
                    linewidth=1.5, marker="s", markersize=4, label=f"{stage} (held out)")
        if i:
            ax.axvline(offset, color="0.6", linestyle=":", linewidth=1.0)
        offset = steps[-1]
    ax.set_xlabel("step" if len(metrics) == 1 else "step (stages in order, each continuing the last)")
    ax.set_ylabel("loss" if evals else "training loss")
    ax.set_title(f"{Path(metrics_path).absolute().parent.name}: " + ("training and held-out loss" if evals
                                                                     else "training loss"))
    ax.grid(True, alpha=0.3)
    ax.legend(title="stage", loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    write_atomic(Path(png_path), buffer.getvalue())
    return Path(png_path)
