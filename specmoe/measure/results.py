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
