"""The `softdimo` command as installed: the service's commands (server.cli), `soak`, `crash` and the server
benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from server import cli as server_cli
from softdimo import cli


def _soak(args: argparse.Namespace) -> None:
    from benchmarks.soak import run_soak, write_report

    api_key = os.environ.get("SOFTDIMO_API_KEY") or None
    report = run_soak(
        args.url,
        minutes=args.minutes,
        concurrency=args.concurrency,
        api_key=api_key,
        seed=args.seed,
        job_share=args.job_share,
        drain_s=args.drain_s,
    )
    print(report.text())
    if args.json:
        write_report(report, args.json)
    if report.server_errors or report.errors or report.jobs.failed or report.jobs.unfinished:
        raise SystemExit(1)


def _crash(args: argparse.Namespace) -> None:
    from benchmarks.crash import CrashPlan, run_crash, write_report
    from benchmarks.running import ServerStartError
    from softdimo.bench_run import BenchError

    options = {
        name: value
        for name, value in vars(args).items()
        if name in CrashPlan.__dataclass_fields__ and name != "weights" and value is not None
    }
    try:
        report = run_crash(
            CrashPlan(weights=tuple(args.weights), **options), say=lambda line: print(line, file=sys.stderr)
        )
    except (BenchError, ServerStartError) as exc:
        raise SystemExit(f"softdimo crash: {exc}") from None
    print(report.text())
    if args.json:
        write_report(report, args.json)
    if report.kills < report.kills_planned or report.jobs.failed or report.lost:
        raise SystemExit(1)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def register(commands, add_bench_suite: cli.SuiteAdder) -> None:
    """Add the service's commands, `soak`, `crash` and the server benchmark suites to the `softdimo` parser."""
    server_cli.register(commands, add_bench_suite)
    from benchmarks import crash, soak

    soaking = commands.add_parser(
        "soak",
        help="mixed /generate and /refine traffic, some of it as jobs, against a server (keyed by SOFTDIMO_API_KEY "
        "if set); exits 1 on any 5xx, and on any job failed or not final at the end",
    )
    soaking.add_argument("--url", default="http://127.0.0.1:8000")
    soaking.add_argument("--minutes", type=float, default=10.0)
    soaking.add_argument("--concurrency", type=int, default=8, help="requests kept in flight")
    soaking.add_argument("--seed", type=int, default=0)
    soaking.add_argument(
        "--job-share",
        type=_fraction,
        default=soak.JOB_SHARE,
        help=f"share of requests sent as jobs (POST /v1/jobs), each waited for (default {soak.JOB_SHARE}; 0: none)",
    )
    soaking.add_argument(
        "--drain-s",
        type=float,
        default=soak.DRAIN_S,
        help=f"longest wait after the traffic for jobs to become final (default {soak.DRAIN_S:g})",
    )
    soaking.add_argument("--json", help="also write the report here")
    soaking.set_defaults(func=_soak)

    plan_fields = crash.CrashPlan.__dataclass_fields__
    crashing = commands.add_parser(
        "crash",
        help="kill -9 a busy `softdimo serve` --kills times, restarting it on the same SQLite job store, then let it "
        "finish; reports every job accepted; exits 1 on any job failed or lost",
    )
    crashing.add_argument("--weights", required=True, nargs="+", help="bundle folders, as `softdimo serve` takes")
    for flag, options, help in (
        ("--kills", {"type": int}, "SIGKILLs, each of a server running a job"),
        ("--device", cli.DEVICE_OPTION[1], "the servers' --device"),
        ("--job-db-path", {}, "the SQLite job store (default: one in a temporary folder, removed at the end)"),
        ("--refine-jobs", {"type": int}, "/refine jobs submitted to each server before its kill"),
        ("--generate-jobs", {"type": int}, "/generate jobs likewise"),
        ("--images", {"type": int}, "images per job"),
        ("--tteo-steps", {"type": int}, "TTEO steps per /refine job"),
        ("--job-concurrency", {"type": int}, "the servers' --job-concurrency"),
        ("--job-lease-s", {"type": float}, "the servers' --job-lease-s"),
        ("--kill-delay-s", {"type": float}, "the kill comes up to this long (a uniform draw) after a job runs"),
        ("--finish-timeout-s", {"type": float}, "longest wait for the last server to finish every job"),
        ("--seed", {"type": int}, "seeds of the jobs and of the kill delays"),
    ):
        default = plan_fields[flag.removeprefix("--").replace("-", "_")].default
        crashing.add_argument(flag, **options, help=help if default is None else f"{help} (default: {default})")
    crashing.add_argument("--json", help="also write the report here")
    crashing.set_defaults(func=_crash)

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
            (("--refine-chunk",), {"type": int, "help": "the server's --refine-chunk (default: the server's)"}),
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
