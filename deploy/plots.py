"""The one way ``forest`` commands draw a figure: matplotlib without a display, saved as PNG and SVG."""

from __future__ import annotations

DPI = 150


def new_figure(**subplots):
    """``(figure, axes)`` from ``plt.subplots(**subplots)`` on the display-less Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**subplots)


def save_figure(figure, path_prefix: str) -> list[str]:
    """Lay out and write ``PREFIX.png`` and ``PREFIX.svg``, close the figure; returns the two paths."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    paths = [f"{path_prefix}.png", f"{path_prefix}.svg"]
    for path in paths:
        figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return paths
