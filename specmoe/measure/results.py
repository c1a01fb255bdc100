"""Result files of every measurement: markdown tables, the environment line under them, PNG figures.

JSON goes through `specmoe.io.write_json` (atomic); tables and plots are made from that JSON, never typed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from ..io import write_bytes

MiB = 2**20


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats are printed as given (format them first), None as '—'."""
    def cell(v):
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, spec=".2f"):
    """`x` formatted with `spec`, or None (a table's '—') when there is no value."""
    return None if x is None else format(x, spec)


def first_crossing(points: Sequence[tuple[float, float]], goal: float) -> float | None:
    """The x at which the piecewise linear curve through `points` (x, y), sorted by x, first reaches `goal`:
    interpolated between the two points around it; the first x if the first point reaches it already; None if
    no point does (what a figure would need, read off a measured curve)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 < goal <= y1:
            return x0 + (goal - y0) * (x1 - x0) / (y1 - y0)
    return pts[0][0] if pts and pts[0][1] >= goal else None


def environment_line(env: dict) -> str:
    """The line under a table: device, versions, git sha and date of an `environment()` record."""
    sha = str(env.get("git_sha"))
    sha = sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")
    return (f"{env.get('device_name')} · torch {env.get('torch')} · transformers {env.get('transformers')} · "
            f"git {sha} · {env.get('date')}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures go to files; no display is needed). Raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Render a matplotlib figure to PNG and write it atomically; closes the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
