"""The `softdimo` command: train each stage, evaluate, and generate images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DEFAULT_TOKENIZER = "weights/shapes-tokenizer"
DEFAULT_FEATURES = "weights/shapes-features"


def _device(args: argparse.Namespace):
    from softdimo.device import resolve_device

    return resolve_device(args.device)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from softdimo.train.tokenizer import TokenizerTraining, export_tokenizer, train_tokenizer
    from softdimo.vq import TokenizerConfig

    training = TokenizerTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    tokenizer = train_tokenizer(Path(args.run_dir), TokenizerConfig(encoder=args.encoder), training, _device(args))
    print(f"wrote {export_tokenizer(tokenizer.cpu(), Path(args.out), training)}")


def _train_features(args: argparse.Namespace) -> None:
    from softdimo.features import FeatureNetConfig
    from softdimo.train.features import FeatureTraining, export_features, train_features

    training = FeatureTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    net = train_features(Path(args.run_dir), FeatureNetConfig(), training, _device(args))
    print(f"wrote {export_features(net.cpu(), Path(args.out), training)}")


def _train_teacher(args: argparse.Namespace) -> None:
    import os

    from softdimo.bundle import read_bundle
    from softdimo.conditioning import Conditioner
    from softdimo.pipeline import load_tokenizer
    from softdimo.teacher import SamplerSettings
    from softdimo.train.teacher import TeacherTraining, export_teacher, train_teacher
    from softdimo.transformer import TransformerConfig

    device = _device(args)
    tokenizer = load_tokenizer(read_bundle(args.tokenizer), device)
    if args.conditioning == "text":
        conditioner = Conditioner.shapes_text()
        sizes = {"text_vocab": conditioner.prompt_tokenizer.size, "text_length": conditioner.prompt_tokenizer.length}
    else:
        conditioner = Conditioner.shapes_class()
        sizes = {"num_classes": conditioner.num_classes}
    cfg = TransformerConfig(
        codebook_size=tokenizer.cfg.codebook_size, tokens=tokenizer.cfg.grid**2,
        width=args.width, depth=args.depth, heads=args.heads, code_dim=len(tokenizer.cfg.levels) if args.code_features else 0, **sizes,
    )  # fmt: skip
    training = TeacherTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every)
    sampler = SamplerSettings(steps=16, guidance=args.guidance)
    model = train_teacher(
        run_dir=Path(args.run_dir), tokenizer=tokenizer, conditioner=conditioner, cfg=cfg,
        training=training, sampler=sampler, device=device,
    )  # fmt: skip
    out = Path(args.out)
    reference = os.path.relpath(Path(args.tokenizer).resolve(), out.resolve())
    name = out.name
    path = export_teacher(model=model.cpu(), conditioner=conditioner, sampler=sampler, training=training, path=out, name=name, tokenizer_reference=reference)
    print(f"wrote {path}")


def _train_reward(args: argparse.Namespace) -> None:
    from softdimo.reward import AlignmentConfig
    from softdimo.train.reward import RewardTraining, export_reward, train_reward

    training = RewardTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = train_reward(Path(args.run_dir), AlignmentConfig(), training, _device(args))
    print(f"wrote {export_reward(model.cpu(), Path(args.out), training)}")


def _train_distill(args: argparse.Namespace) -> None:
    import os

    from softdimo.bundle import read_bundle
    from softdimo.generator import GeneratorSettings
    from softdimo.pipeline import load_pipeline, load_reward
    from softdimo.train.distill import DistillParts, DistillTraining, export_generator, train_distill
    from softdimo.tteo import TTEOSettings

    device = _device(args)
    teacher = load_pipeline(args.teacher, device)
    reward = load_reward(read_bundle(args.reward), device) if args.reward else None
    if args.reward_weight and reward is None:
        raise SystemExit("softdimo: --reward-weight needs --reward")
    training = DistillTraining(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, aux_lr=args.lr, seed=args.seed, guidance=args.guidance,
        relaxation=args.relaxation, gan_weight=args.gan_weight, reward_weight=args.reward_weight, eval_every=args.eval_every,
    )  # fmt: skip
    settings = GeneratorSettings(r_init=args.r_init, sigma=args.sigma)
    initial = None
    if args.init:
        start = load_pipeline(args.init, device)
        if not hasattr(start, "generator") or start.generator.cfg != teacher.model.cfg:
            raise SystemExit(f"softdimo: --init {args.init} is not a one-step model of the teacher's architecture")
        initial = start.generator.model
    parts = DistillParts(
        teacher=teacher.model, tokenizer=teacher.tokenizer, conditioner=teacher.conditioner, reward=reward, initial=initial,
    )  # fmt: skip
    generator = train_distill(run_dir=Path(args.run_dir), parts=parts, generator_settings=settings, training=training, device=device)
    out = Path(args.out).resolve()
    relative = lambda path: os.path.relpath(Path(path).resolve(), out)  # noqa: E731
    teacher_bundle = read_bundle(args.teacher)
    tokenizer_path = teacher_bundle.path / teacher_bundle.config["tokenizer"]
    generator.model.cpu()
    path = export_generator(
        generator=generator, conditioner=teacher.conditioner, path=out, name=out.name, tokenizer_reference=relative(tokenizer_path),
        reward_references=[relative(args.reward)] if args.reward else [], tteo=TTEOSettings().to_dict(), training=training,
        teacher_reference=relative(args.teacher),
    )  # fmt: skip
    print(f"wrote {path}")


def _eval(args: argparse.Namespace) -> None:
    from softdimo import report
    from softdimo.pipeline import load_features

    device = _device(args)
    features = load_features(args.features, device)
    results = []
    for model_path in args.models:
        table = report.evaluate_bundle(
            model_path, features=features, prompts=args.prompts, steps=args.steps, tteo_steps=args.tteo_steps,
            best_of=args.best_of, device=device, grid_dir=Path(args.grid) if args.grid else None,
        )  # fmt: skip
        print(f"\n{table.markdown()}\n")
        results.append(table.as_dict())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _generate(args: argparse.Namespace) -> None:
    from softdimo.images import encode_image
    from softdimo.pipeline import load_pipeline

    pipeline = load_pipeline(args.model, _device(args))
    if args.class_label is not None:
        condition = pipeline.conditioner.encode_labels([args.class_label] * args.n)
    else:
        condition = pipeline.conditioner.encode_prompts([args.prompt] * args.n)
    seeds = [args.seed + i for i in range(args.n)]
    images = pipeline.generate(condition, seeds, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images):
        path = out / f"{seed}.png"
        path.write_bytes(encode_image(image, "png"))
        print(path)


def _serve(args: argparse.Namespace) -> None:
    from server.app import serve
    from server.settings import Settings

    from pydantic import ValidationError

    flags = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"softdimo serve: invalid settings: {problems}") from None
    serve(settings)


def _soak(args: argparse.Namespace) -> None:
    import os

    from server.soak import run_soak, write_report

    api_key = os.environ.get("SOFTDIMO_API_KEY") or None
    report = run_soak(args.url, minutes=args.minutes, concurrency=args.concurrency, api_key=api_key, seed=args.seed)
    print(report.text())
    if args.json:
        write_report(report, args.json)
    if report.server_errors or report.errors:
        raise SystemExit(1)


def _refine(args: argparse.Namespace) -> None:
    from softdimo import shapes
    from softdimo.images import encode_image
    from softdimo.pipeline import load_pipeline
    from softdimo.tteo import TTEOSettings, candidate_seeds
    from softdimo.vq import to_uint8

    pipeline = load_pipeline(args.model, _device(args))
    if not hasattr(pipeline, "refine"):
        raise SystemExit("softdimo: refine needs a one-step model")
    if args.class_label is not None:
        condition = pipeline.conditioner.encode_labels([args.class_label] * args.n)
        text = shapes.class_prompt(args.class_label).text()
    else:
        condition = pipeline.conditioner.encode_prompts([args.prompt] * args.n)
        text = args.prompt
    seeds = [args.seed + i for i in range(args.n)]
    settings = TTEOSettings(steps=args.steps, lr=args.lr, best_of=args.best_of, target=args.target)
    refined = pipeline.refine(condition, [text] * args.n, candidate_seeds(seeds, args.best_of), settings, reward=args.reward)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (seed, image) in enumerate(zip(seeds, to_uint8(refined.images))):
        path = out / f"{seed}-refined.png"
        path.write_bytes(encode_image(image, "png"))
        print(f"{path}  reward {refined.reward_before[i]:.4f} -> {refined.reward_after[i]:.4f}")


def _bench(args: argparse.Namespace) -> None:
    """Run one `softdimo bench` suite: print its markdown table, and write the raw results with --json."""
    from softdimo import bench

    # Options left out take the suite dataclass's defaults (stated once, there); the JSON records every value used.
    options = {action.dest: getattr(args, action.dest) for action in args.bench_options}
    flags = [(action.option_strings[0], options[action.dest]) for action in args.bench_options]
    command = bench.command_line(["softdimo", "bench", args.suite], flags)
    given = {k: v for k, v in options.items() if v is not None and k not in ("json", "plot")}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        if args.suite == "offline":
            result = bench.run_offline(bench.OfflineBench(**config), command)
            table = bench.offline_table(result)
        else:
            from server import bench as server_bench

            run, make_table, config_class = {
                "serve": (server_bench.run_serve, server_bench.serve_table, server_bench.ServeBench),
                "steps": (server_bench.run_steps, server_bench.steps_table, server_bench.StepsBench),
                "refine": (server_bench.run_refine, server_bench.refine_table, server_bench.RefineBench),
            }[args.suite]
            result = run(config_class(**config), command)
            table = make_table(result)
    except bench.BenchError as exc:
        print(f"softdimo bench {args.suite}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(table)
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if getattr(args, "plot", None):
        for path in server_bench.plot_serve(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)


def _add_bench_parser(commands) -> None:
    """`softdimo bench offline|serve|steps|refine`; every option becomes a field of the suite's config dataclass."""
    bench = commands.add_parser(
        "bench", help="benchmarks: every figure a ratio or curve measured in one run",
        description="Each suite prints a markdown table; defaults are listed in docs/benchmarks.md and recorded in --json.",
    )  # fmt: skip
    suites = bench.add_subparsers(dest="suite", required=True)

    def suite(name: str, help: str, options: list[tuple]) -> None:
        p = suites.add_parser(name, help=help)
        actions = [p.add_argument(*flags, **kw) for flags, kw in options]
        actions.append(p.add_argument("--json", help="also write the raw results here"))
        if name == "serve":
            actions.append(p.add_argument("--plot", help="folder for throughput.png and latency.png (needs matplotlib)"))
        p.set_defaults(func=_bench, bench_options=actions)

    device = (("--device",), {"choices": ["auto", "cpu", "cuda"]})
    server = [
        device,
        (("--max-batch-size",), {"type": int, "help": "the batched server's --max-batch-size"}),
        (("--max-wait-ms",), {"type": float, "help": "the servers' --max-wait-ms (default: the server's)"}),
        (("--duration-s",), {"type": float, "help": "measured seconds per load level"}),
        (("--warmup-s",), {"type": float, "help": "warm-up seconds per load level, not counted"}),
        (("--max-requests",), {"type": int, "help": "requests per load level at most"}),
        (("--timeout-s",), {"type": float, "help": "client-side timeout per request"}),
        (("--repeats",), {"type": int, "help": "timed calls per offline measurement (median)"}),
        (("--server",), {"choices": ["process", "thread"],
                         "help": "run `softdimo serve` as a child process, or uvicorn in a thread of this one"}),
    ]  # fmt: skip
    suite("offline", "images/s, FLOPs and share of the matmul peak of one bundle, per batch size", [
        (("--model",), {"required": True, "help": "bundle folder"}),
        device,
        (("--batch-sizes",), {"type": int, "nargs": "+", "help": "images per batch, one row each (default 1 2 4 … 64)"}),
        (("--steps",), {"type": int, "nargs": "+", "help": "sampling steps (masked-diffusion bundles; default: the bundle's)"}),
        (("--repeats",), {"type": int, "help": "timed calls per batch size (median)"}),
        (("--warmup",), {"type": int, "help": "untimed calls per batch size first"}),
        (("--matmul-size",), {"type": int, "help": "side of the matmuls timed for the peak (default 2048 CPU, 8192 CUDA)"}),
    ])  # fmt: skip
    suite("serve", "concurrency sweep through the server, batched against --compare-batch-size", [
        (("--model",), {"required": True, "help": "bundle folder"}),
        (("--concurrency",), {"type": int, "nargs": "+", "help": "closed-loop clients per load level (default 1 2 4 … 64)"}),
        (("--compare-batch-size",), {"type": int, "help": "the other server's --max-batch-size"}),
        (("--endpoint",), {"choices": ["generate", "refine"]}),
        (("--tteo-steps",), {"type": int, "help": "/refine: TTEO steps per request (default: the bundle's)"}),
        *server,
    ])  # fmt: skip
    suite("steps", "one-step model against its teacher at each sampling-steps value, through one server", [
        (("--one-step",), {"required": True, "help": "one-step bundle folder"}),
        (("--teacher",), {"required": True, "help": "masked-diffusion bundle folder"}),
        (("--steps",), {"type": int, "nargs": "+", "help": "teacher sampling steps, one row each (default 4 8 16)"}),
        (("--concurrency",), {"type": int}),
        *server,
    ])  # fmt: skip
    suite("refine", "one TTEO step against one forward; concurrent /refine batched against serial", [
        (("--model",), {"required": True, "help": "one-step bundle folder with a reward"}),
        (("--requests",), {"type": int, "help": "concurrent /refine requests per burst"}),
        (("--tteo-steps",), {"type": int, "help": "TTEO steps (default: the bundle's)"}),
        (("--rounds",), {"type": int, "help": "measured bursts per server"}),
        *[o for o in server if o[0][0] not in ("--duration-s", "--warmup-s", "--max-requests")],
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softdimo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, run_dir: str, out: str, steps: int, batch_size: int, lr: float) -> None:
        p.add_argument("--run-dir", default=run_dir, help="checkpoints and metrics; rerun the same command to resume")
        p.add_argument("--out", default=out, help="bundle folder written at the end")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch-size", type=int, default=batch_size)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    train = commands.add_parser("train", help="train one stage of the pipeline (resumable from --run-dir)")
    stages = train.add_subparsers(dest="stage", required=True)

    tok = stages.add_parser("tokenizer", help="the VQ tokenizer")
    common(tok, "runs/tokenizer", DEFAULT_TOKENIZER, 4000, 32, 1e-3)
    tok.add_argument("--encoder", choices=["conv", "patch"], default="conv",
                     help="conv: codes see neighbouring patches (the shipped tokenizer); patch: a code sees its own patch only")
    tok.set_defaults(func=_train_tokenizer)

    feat = stages.add_parser("features", help="the feature network for Fréchet distances")
    common(feat, "runs/features", DEFAULT_FEATURES, 1500, 64, 2e-3)
    feat.set_defaults(func=_train_features)

    teacher = stages.add_parser("teacher", help="a masked-diffusion teacher")
    teacher.add_argument("conditioning", choices=["text", "class"])
    common(teacher, "runs/teacher-{conditioning}", "weights/shapes-teacher-{conditioning}", 4000, 40, 1e-3)
    teacher.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    teacher.add_argument("--width", type=int, default=192)
    teacher.add_argument("--depth", type=int, default=4)
    teacher.add_argument("--heads", type=int, default=6)
    teacher.add_argument("--code-features", action=argparse.BooleanOptionalAction, default=False,
                         help="token embeddings and logits also learn from the tokenizer's code vectors")
    teacher.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance the bundle samples with")
    teacher.add_argument("--eval-every", type=int, default=500)
    teacher.set_defaults(func=_train_teacher)

    reward = stages.add_parser("reward", help="the CLIP-style Shapes reward model")
    common(reward, "runs/reward", "weights/shapes-clip", 2000, 64, 1e-3)
    reward.set_defaults(func=_train_reward)

    distill = stages.add_parser("distill", help="a one-step generator from a teacher: Di[M]O, plus Soft-Di[M]O's GAN and reward terms")
    common(distill, "runs/distill", "weights/shapes-softdimo-text", 1500, 32, 1e-4)
    distill.add_argument("--teacher", default="weights/shapes-teacher-text")
    distill.add_argument("--init", help="one-step bundle to continue from (e.g. Di[M]O before GAN and reward terms); default: the teacher")
    distill.add_argument("--reward", help="reward bundle used by --reward-weight and shipped with the model for TTEO")
    distill.add_argument("--guidance", type=float, default=2.0, help="the teacher's classifier-free guidance")
    distill.add_argument("--relaxation", choices=["soft", "straight-through"], default="soft")
    distill.add_argument("--gan-weight", type=float, default=0.0)
    distill.add_argument("--reward-weight", type=float, default=0.0)
    distill.add_argument("--r-init", type=float, default=0.6, help="share of the input that starts as mask tokens")
    distill.add_argument("--sigma", type=float, default=0.1, help="Gaussian noise on the input embeddings")
    distill.add_argument("--eval-every", type=int, default=250)
    distill.set_defaults(func=_train_distill)

    ev = commands.add_parser("eval", help="judge models on held-out prompts: pass rates, Fréchet distance, spread")
    ev.add_argument("models", nargs="+", help="bundle folders (tokenizers are judged on reconstructions)")
    ev.add_argument("--prompts", type=int, default=300)
    ev.add_argument("--steps", type=int, nargs="*", help="sampling steps to evaluate masked-diffusion models at")
    ev.add_argument("--features", default=DEFAULT_FEATURES)
    ev.add_argument("--json", help="also write the results here")
    ev.add_argument("--tteo-steps", type=int, nargs="*", default=[], help="one-step models: also refine with TTEO for these steps")
    ev.add_argument("--best-of", type=int, nargs="*", default=[], help="one-step models: also best-of-N, alone and with TTEO")
    ev.add_argument("--grid", help="folder for a PNG grid of the first 50 images of each row")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_eval)

    gen = commands.add_parser("generate", help="write PNG files for a prompt or class label")
    gen.add_argument("--model", default="weights/shapes-softdimo-text")
    target = gen.add_mutually_exclusive_group(required=True)
    target.add_argument("--prompt")
    target.add_argument("--class-label", type=int)
    gen.add_argument("-n", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, help="sampling steps (masked-diffusion models)")
    gen.add_argument("--out", default="out")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=_generate)

    ref = commands.add_parser("refine", help="TTEO: optimise a one-step model's input against its reward, write PNG files")
    ref.add_argument("--model", default="weights/shapes-softdimo-text")
    target = ref.add_mutually_exclusive_group(required=True)
    target.add_argument("--prompt")
    target.add_argument("--class-label", type=int)
    ref.add_argument("-n", type=int, default=4)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--steps", type=int, default=20)
    ref.add_argument("--lr", type=float, default=0.2)
    ref.add_argument("--best-of", type=int, default=1)
    ref.add_argument("--target", choices=["input", "logits"], default="input")
    ref.add_argument("--reward", help="reward name (default: the model's first)")
    ref.add_argument("--out", default="out")
    ref.add_argument("--device", default="auto")
    ref.set_defaults(func=_refine)

    srv = commands.add_parser("serve", help="run the HTTP server (flags override SOFTDIMO_* environment settings)")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--weights", nargs="+", help="bundle folders to serve; the first is the default model")
    srv.add_argument("--device", choices=["auto", "cpu", "cuda"])
    srv.add_argument("--max-batch-size", type=int)
    srv.add_argument("--max-wait-ms", type=float)
    srv.add_argument("--refine-max-wait-ms", type=float, help="the longest a /refine batch waits for company")
    srv.add_argument("--max-queue", type=int)
    srv.add_argument("--request-timeout-s", type=float)
    srv.add_argument("--drain-timeout-s", type=float)
    srv.add_argument("--max-request-cost", type=int, help="images x steps x best_of allowed in one request")
    srv.add_argument("--max-queue-cost", type=int, help="queued cost per model and endpoint before 429")
    srv.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413")
    srv.add_argument("--auth-exempt-paths", nargs="*", help="paths answered without the API key (set by SOFTDIMO_API_KEY)")
    srv.add_argument("--log-level")
    srv.set_defaults(func=_serve)

    soak = commands.add_parser(
        "soak", help="mixed /generate and /refine traffic against a server (keyed by SOFTDIMO_API_KEY if set); exits 1 on any 5xx"
    )
    soak.add_argument("--url", default="http://127.0.0.1:8000")
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--concurrency", type=int, default=8, help="requests kept in flight")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", help="also write the report here")
    soak.set_defaults(func=_soak)

    _add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("run_dir", "out"):
        if isinstance(getattr(args, key, None), str) and "{conditioning}" in getattr(args, key):
            setattr(args, key, getattr(args, key).format(conditioning=args.conditioning))
    try:
        args.func(args)
    except (ValueError, RuntimeError) as exc:
        from softdimo.bundle import BundleError
        from softdimo.conditioning import ConditionError
        from softdimo.device import DeviceError

        if isinstance(exc, (BundleError, ConditionError, DeviceError)):
            print(f"softdimo: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
