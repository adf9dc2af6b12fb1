"""The `softdimo` command as installed: the service's commands (server.cli), `soak` and the server benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from server import cli as server_cli
from softdimo import cli


def _soak(args: argparse.Namespace) -> None:
    from benchmarks.soak import run_soak, write_report

    api_key = os.environ.get("SOFTDIMO_API_KEY") or None
    report = run_soak(args.url, minutes=args.minutes, concurrency=args.concurrency, api_key=api_key, seed=args.seed)
    print(report.text())
    if args.json:
        write_report(report, args.json)
    if report.server_errors or report.errors:
        raise SystemExit(1)


def register(commands, add_bench_suite: cli.SuiteAdder) -> None:
    """Add the service's commands, `soak` and the server benchmark suites to the `softdimo` parser."""
    server_cli.register(commands, add_bench_suite)

    soak = commands.add_parser(
        "soak",
        help="mixed /generate and /refine traffic against a server (keyed by SOFTDIMO_API_KEY if set); "
        "exits 1 on any 5xx",
    )
    soak.add_argument("--url", default="http://127.0.0.1:8000")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--concurrency", type=int, default=8, help="requests kept in flight")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", help="also write the report here")
    soak.set_defaults(func=_soak)

    from benchmarks import lanes, plots, refine, serve, steps
    from benchmarks.load import LOAD_GENERATORS

    def plot(result: dict, args: argparse.Namespace) -> None:
        if args.plot:
            for path in plots.plot_serve(result, args.plot):
                print(f"wrote {path}", file=sys.stderr)

    options = [
        cli.DEVICE_OPTION,
        (("--max-batch-size",), {"type": int, "help": "the batched server's --max-batch-size"}),
        (("--max-wait-ms",), {"type": float, "help": "the servers' --max-wait-ms (default: the server's)"}),
        (("--duration-s",), {"type": float, "help": "measured seconds per load level"}),
        (("--warmup-s",), {"type": float, "help": "warm-up seconds per load level, not counted"}),
        (("--max-requests",), {"type": int, "help": "requests per load level at most"}),
        (("--timeout-s",), {"type": float, "help": "client-side timeout per request"}),
        (("--repeats",), {"type": int, "help": "timed calls per offline measurement (median)"}),
        (
            ("--server",),
            {
                "choices": ["process", "thread"],
                "help": "run `softdimo serve` as a child process, or uvicorn in a thread of this one",
            },
        ),
        *cli.RUNTIME_OPTIONS,
    ]
    add_bench_suite(
        "serve",
        "concurrency sweep, batched against --compare-batch-size; or two models or settings side by side",
        [
            (("--model",), {"required": True, "nargs": "+", "help": "bundle folder; two to compare them"}),
            (
                ("--concurrency",),
                {"type": int, "nargs": "+", "help": "closed-loop clients per load level (default 1 2 4 … 64)"},
            ),
            (("--compare-batch-size",), {"type": int, "help": "the other server's --max-batch-size"}),
            (("--endpoint",), {"choices": ["generate", "refine"]}),
            (("--tteo-steps",), {"type": int, "help": "/refine: TTEO steps per request (default: the bundle's)"}),
            (
                ("--rounds",),
                {"type": int, "help": "comparisons: interleaved rounds per server and level, sharing --duration-s"},
            ),
            (
                ("--peer",),
                {"choices": list(serve.PEERS), "help": "compare with the model behind this general-purpose server"},
            ),
            (
                ("--load-generator",),
                {
                    "choices": list(LOAD_GENERATORS),
                    "help": "who sends the load: this project's client (builtin) or hey (Debian hey)",
                },
            ),
            *options,
        ],
        run=serve.run_serve,
        table=serve.serve_table,
        config=serve.ServeBench,
        after=plot,
        extra=[(("--plot",), {"help": "folder for throughput.png and latency.png (needs matplotlib)"})],
    )
    add_bench_suite(
        "steps",
        "one-step model against its teacher at each sampling-steps value, through one server",
        [
            (("--one-step",), {"required": True, "help": "one-step bundle folder"}),
            (("--teacher",), {"required": True, "help": "masked-diffusion bundle folder"}),
            (
                ("--steps",),
                {"type": int, "nargs": "+", "help": "teacher sampling steps, one row each (default 4 8 16)"},
            ),
            (("--concurrency",), {"type": int}),
            *options,
        ],
        run=steps.run_steps,
        table=steps.steps_table,
        config=steps.StepsBench,
    )
    add_bench_suite(
        "refine",
        "one TTEO step against one forward; concurrent /refine batched against serial",
        [
            (("--model",), {"required": True, "help": "one-step bundle folder with a reward"}),
            (("--requests",), {"type": int, "help": "concurrent /refine requests per burst"}),
            (("--tteo-steps",), {"type": int, "help": "TTEO steps (default: the bundle's)"}),
            (("--rounds",), {"type": int, "help": "measured bursts per server"}),
            *[o for o in options if o[0][0] not in ("--duration-s", "--warmup-s", "--max-requests")],
        ],
        run=refine.run_refine,
        table=refine.refine_table,
        config=refine.RefineBench,
    )
    add_bench_suite(
        "lanes",
        "/generate p50 and p99 alone, then under a saturating load of /refine jobs",
        [
            (("--model",), {"required": True, "help": "one-step bundle folder with a reward"}),
            (("--concurrency",), {"type": int, "help": "closed-loop /generate clients"}),
            (("--jobs",), {"type": int, "help": "/refine jobs kept submitted during the loaded run"}),
            (("--job-images",), {"type": int, "help": "images per job"}),
            (("--tteo-steps",), {"type": int, "help": "TTEO steps per job (default: the bundle's)"}),
            *options,
        ],
        run=lanes.run_lanes,
        table=lanes.lanes_table,
        config=lanes.LanesBench,
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extend=register)


if __name__ == "__main__":
    sys.exit(main())
