"""PNG plots of `softdimo bench serve`: throughput and latency against concurrency, one line per server."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def plot_serve(result: dict, folder: str | os.PathLike) -> list[Path]:
    """throughput.png and latency.png against concurrency, batched vs unbatched; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "softdimo bench: skipping --plot: matplotlib is not installed (pip install 'softdimo[bench]')",
            file=sys.stderr,
        )
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]

    def series(label: str, key):
        levels = runs[label]["levels"]
        return [lv["concurrency"] for lv in levels], [key(lv) for lv in levels]

    throughput = {"": lambda level: level["images_per_s"]}
    latency = {" p50": lambda level: level["latency_ms"]["p50"], " p99": lambda level: level["latency_ms"]["p99"]}
    device = result["machine"].get("gpu") or result["machine"]["device"]
    written = []
    for name, ylabel, keys in (
        ("throughput.png", "images/s", throughput),
        ("latency.png", "client-side latency (ms)", latency),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for colour, label in enumerate(runs):  # one colour per server, one line style per statistic
            for style, (suffix, key) in zip(("-", "--"), keys.items()):
                xs, ys = series(label, key)
                legend = f"--max-batch-size {runs[label]['max_batch_size']}{suffix}"
                ax.plot(xs, ys, f"o{style}", color=f"C{colour}", label=legend)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result['endpoint']} on {result['model']['name']} ({device})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)
    return written
