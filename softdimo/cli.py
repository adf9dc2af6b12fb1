"""The `softdimo` command: train each stage, evaluate, and generate images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from softdimo.runtime import PRECISIONS
from softdimo.shipped import DEFAULT_FEATURES, DEFAULT_MODEL
from softdimo.tteo import REQUEST_BEST_OF, TARGETS


def _device(args: argparse.Namespace):
    from softdimo.device import resolve_device

    return resolve_device(args.device)


def _train(args: argparse.Namespace) -> None:
    from softdimo.train.recipe import load_recipe, profile_recipe, run_all, run_parallel

    if args.profile:
        total = 0.0
        for path in args.recipes:
            cost, phases = profile_recipe(load_recipe(path, args.set or ()), _device(args), args.profile)
            total += cost.total_s
            parts = [f"{cost.step_s:.3g} s a step x {cost.steps:,} steps"]
            if cost.evaluations:
                parts.append(f"{cost.evaluations} evaluations x {cost.eval_s:.3g} s")
            parts.append(f"setup {cost.setup_s:.3g} s")
            line = f"{path}: " + ", ".join(parts) + f" = {_duration(cost.total_s)}"
            if phases:
                line += "; a step by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            print(line + f" (torch threads {_threads()})", flush=True)
        if len(args.recipes) > 1:
            print(f"{len(args.recipes)} stages one after another: {_duration(total)}")
        return
    if args.jobs > 1:
        _device(args)  # a device that is not there is refused here, not in every child
        run_parallel(args.recipes, args.device, args.jobs, overrides=args.set or (), force=args.force)
        return
    run_all(args.recipes, _device(args), overrides=args.set or (), force=args.force)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _settings(items: list[str] | None) -> dict:
    """KEY=VALUE words -> a dict of numbers (or strings where a value is not a number)."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key] = value
    return out


HARD_NEGATIVE_ACCURACY = {  # what a reward's accuracy on each side says, by side
    "prompts": "the true prompt scores above all 4 hard negative prompts for {share} of {n} held-out images",
    "images": "the true image scores above all 4 hard negative images for {share} of {n} held-out prompts",
}


def _eval(args: argparse.Namespace) -> None:
    from softdimo import evaluation
    from softdimo.bundle import read_bundle
    from softdimo.pipeline import load_features
    from softdimo.runtime import RuntimeSettings

    device = _device(args)
    features = load_features(args.features, device)
    results = []
    for model_path in args.models:
        if read_bundle(model_path).config.get("kind") == "reward":
            accuracy = evaluation.reward_accuracy(
                model_path, images=args.prompts, device=device, placement=args.placement
            )
            for side, what in HARD_NEGATIVE_ACCURACY.items():
                kinds = ", ".join(f"{kind} {share:.1%}" for kind, share in accuracy[side].items() if kind != "overall")
                said = what.format(share=f"{accuracy[side]['overall']:.1%}", n=args.prompts)
                print(f"\n{model_path}: {said} ({kinds})")
            print()
            results.append({"model": str(model_path), "hard_negative_accuracy": accuracy, "images": args.prompts})
            continue
        given = {"precision": args.precision, "compile": args.compile or None}
        table = evaluation.evaluate_bundle(
            model_path,
            features=features,
            prompts=args.prompts,
            steps=args.steps,
            tteo_steps=args.tteo_steps,
            best_of=args.best_of,
            device=device,
            grid_dir=Path(args.grid) if args.grid else None,
            placement=args.placement,
            sampler=_settings(args.sampler),
            tteo=_settings(args.tteo),
            generator=_settings(args.generator),
            check=_settings(args.check),
            coverage_prompts=args.coverage_prompts,
            coverage_seeds=args.coverage_seeds,
            runtime=RuntimeSettings(**{k: v for k, v in given.items() if v is not None}),
        )
        print(f"\n{table.markdown()}\n")
        results.append(table.as_dict())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _eval_edits(args: argparse.Namespace) -> None:
    from softdimo.bench_run import command_line
    from softdimo.edit_evaluation import evaluate_edits

    flags = [
        ("--edits", args.edits),
        ("--tteo-steps", args.tteo_steps or None),
        ("--strength", args.strength),
        ("--coverage-prompts", args.coverage_prompts),
        ("--coverage-seeds", args.coverage_seeds),
        ("--device", args.device),
    ]
    tables = evaluate_edits(
        args.model,
        command=command_line(["softdimo", "eval-edits", args.model], flags),
        edits=args.edits,
        tteo_steps=args.tteo_steps,
        strength=args.strength,
        coverage_prompts=args.coverage_prompts,
        coverage_seeds=args.coverage_seeds,
        device=_device(args),
    )
    print(f"\n{tables.markdown()}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(tables.as_dict(), indent=2) + "\n")


def _curve(args: argparse.Namespace) -> None:
    from softdimo.train.curve import curve_table

    for run_dir in args.runs:
        print(f"{run_dir}\n\n{curve_table(run_dir)}\n")


def _generate(args: argparse.Namespace) -> None:
    from softdimo.images import encode_image
    from softdimo.pipeline import load_pipeline
    from softdimo.seeding import request_seeds

    pipeline = load_pipeline(args.model, _device(args))
    condition = pipeline.conditioner.request(args.prompt, args.class_label).repeat_interleave(args.n, 0)
    seeds = request_seeds(args.seed, args.n)
    images = pipeline.generate(condition, seeds, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images):
        path = out / f"{seed}.png"
        path.write_bytes(encode_image(image, "png"))
        print(path)


def _refine(args: argparse.Namespace) -> None:
    from softdimo.images import encode_image
    from softdimo.pipeline import load_pipeline
    from softdimo.seeding import request_seeds
    from softdimo.tteo import candidate_seeds
    from softdimo.vq import to_uint8

    pipeline = load_pipeline(args.model, _device(args))
    if not hasattr(pipeline, "refine"):
        raise SystemExit("softdimo: refine needs a one-step model")
    condition = pipeline.conditioner.request(args.prompt, args.class_label).repeat_interleave(args.n, 0)
    text = pipeline.conditioner.reward_text(args.prompt, args.class_label)
    seeds = request_seeds(args.seed, args.n)
    settings = pipeline.tteo.for_request(steps=args.steps, lr=args.lr, best_of=args.best_of, target=args.target)
    refined = pipeline.refine(
        condition, [text] * args.n, candidate_seeds(seeds, settings.best_of), settings, reward=args.reward
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (seed, image) in enumerate(zip(seeds, to_uint8(refined.images))):
        path = out / f"{seed}-refined.png"
        path.write_bytes(encode_image(image, "png"))
        print(f"{path}  reward {refined.reward_before[i]:.4f} -> {refined.reward_after[i]:.4f}")


def _import(args: argparse.Namespace) -> None:
    """Make a bundle of a checkpoint folder on disk: a diffusers MUSE pipeline (a teacher) or a CLIP model (a
    reward)."""
    if args.format == "muse":
        from softdimo.muse import MuseSamplerSettings, write_teacher_bundle

        given = {"steps": args.steps, "guidance": args.guidance}
        sampler = MuseSamplerSettings(**{k: v for k, v in given.items() if v is not None})
        out = write_teacher_bundle(args.out, name=args.name, sampler=sampler, source=args.source)
    else:
        from softdimo.clip_reward import write_clip_bundle

        out = write_clip_bundle(args.out, source=args.source, name=args.name)
    print(out)


def _bench(args: argparse.Namespace) -> None:
    """Run one `softdimo bench` suite: print its markdown table, and write the raw results with --json."""
    from softdimo import bench_run

    run, make_table, config_class, after = args.bench_suite
    # Options left out take the suite dataclass's defaults (stated once, there); the JSON records every value used.
    options = {action.dest: getattr(args, action.dest) for action in args.bench_options}
    flags = [(action.option_strings[0], options[action.dest]) for action in args.bench_options]
    command = bench_run.command_line(["softdimo", "bench", args.suite], flags)
    given = {k: v for k, v in options.items() if v is not None and k not in ("json", "plot")}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        result = run(config_class(**config), command)
    except bench_run.BenchError as exc:
        print(f"softdimo bench {args.suite}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(make_table(result))
    if args.json:
        bench_run.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if after is not None:
        after(result, args)


SuiteAdder = Callable[..., None]


def _add_bench_parser(commands) -> SuiteAdder:
    """`softdimo bench SUITE`; every option becomes a field of the suite's config dataclass. Returns the function
    that adds a suite, so the serving benchmarks are registered by the tooling package (benchmarks/)."""
    bench = commands.add_parser(
        "bench",
        help="benchmarks: every figure a ratio or curve measured in one run",
        description="Each suite prints a markdown table; "
        "defaults are listed in docs/benchmarks.md and recorded in --json.",
    )
    suites = bench.add_subparsers(dest="suite", required=True)

    def suite(
        name: str, help: str, options: list[tuple], *, run, table, config, after=None, extra: list[tuple] = ()
    ) -> None:
        p = suites.add_parser(name, help=help)
        actions = [p.add_argument(*flags, **kw) for flags, kw in options]
        actions.append(p.add_argument("--json", help="also write the raw results here"))
        actions += [p.add_argument(*flags, **kw) for flags, kw in extra]
        p.set_defaults(func=_bench, bench_options=actions, bench_suite=(run, table, config, after))

    from softdimo import bench as offline

    suite(
        "offline",
        "images/s, FLOPs and share of the peak per batch size; two models or settings side by side",
        [
            (("--model",), {"nargs": "+", "help": "bundle folder; two to compare them"}),
            (
                ("--config",),
                {
                    "nargs": "+",
                    "choices": list(offline.SCALES),
                    "help": "instead of --model: a network the size of a published model, random weights, no decoder",
                },
            ),
            DEVICE_OPTION,
            (
                ("--batch-sizes",),
                {"type": int, "nargs": "+", "help": "images per batch, one row each (default 1 2 4 … 64)"},
            ),
            (
                ("--steps",),
                {"type": int, "nargs": "+", "help": "sampling steps (masked-diffusion bundles; default: the bundle's)"},
            ),
            (("--repeats",), {"type": int, "help": "timed calls per measurement (median)"}),
            (("--warmup",), {"type": int, "help": "untimed calls per batch size first"}),
            (
                ("--matmul-size",),
                {"type": int, "help": "side of the matmuls timed for the peak (default 2048 CPU, 8192 CUDA)"},
            ),
            *RUNTIME_OPTIONS,
            (("--rounds",), {"type": int, "help": "comparisons: interleaved timed rounds per arm and batch size"}),
            (
                ("--peak-tflops",),
                {"type": float, "help": "the device's dense bf16 peak (default: the datasheet's for a known GPU)"},
            ),
        ],
        run=offline.run_offline,
        table=offline.offline_table,
        config=offline.OfflineBench,
    )
    return suite


DEVICE_OPTION = (("--device",), {"choices": ["auto", "cpu", "cuda"]})
# How the models run (softdimo.runtime), one value or two to compare: e.g. --precision fp32 bf16.
RUNTIME_OPTIONS = [
    (
        ("--precision",),
        {
            "nargs": "+",
            "choices": list(PRECISIONS),
            "help": "bf16: under bfloat16 autocast; int8: int8 Linear weights (CPU)",
        },
    ),
    (
        ("--compile",),
        {"nargs": "+", "choices": ["off", "on"], "help": "torch.compile, batches padded to power-of-two buckets"},
    ),
    (
        ("--pin-memory",),
        {"nargs": "+", "choices": ["off", "on"], "help": "images back to the host through pinned memory"},
    ),
]
Extension = Callable[[Any, SuiteAdder], None]


def build_parser(extend: Extension | None = None) -> argparse.ArgumentParser:
    """The library's commands; `extend(commands, add_bench_suite)` adds more (the server package adds serving)."""
    from softdimo.muse import MuseSamplerSettings

    parser = argparse.ArgumentParser(prog="softdimo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train bundles from recipes (recipes/*.toml), in dependency order, "
        "each stage resumable from its run folder",
    )
    train.add_argument("recipes", nargs="+", help="recipe files; stages already done for the same recipe are skipped")
    train.add_argument(
        "--set", action="append", metavar="TABLE.KEY=VALUE", help="override a recipe value (TOML syntax)"
    )
    train.add_argument("--force", action="store_true", help="train stages again even when done")
    train.add_argument(
        "--profile",
        type=int,
        metavar="STEPS",
        help="time this many training steps (and one evaluation) of each recipe's stage and print what the whole "
        "stage takes here, a teacher's step also by phase; trains and writes nothing (the bundles a stage reads must "
        "exist)",
    )
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="stages trained at once, each a process with its share of the CPU threads (a CPU-only machine)",
    )
    train.set_defaults(func=_train)

    from softdimo.judge import COVERAGE_SEEDS
    from softdimo.evaluation import COVERAGE_PROMPTS

    ev = commands.add_parser(
        "eval", help="judge models on held-out prompts: pass rates beside layout coverage, Fréchet distance"
    )
    ev.add_argument(
        "models", nargs="+", help="bundle folders (tokenizers are judged on reconstructions, rewards on hard negatives)"
    )
    ev.add_argument("--prompts", type=int, default=300, help="held-out prompts the pass rate is measured on")
    ev.add_argument(
        "--coverage-prompts",
        type=int,
        default=COVERAGE_PROMPTS,
        help="the first N held-out prompts whose layout coverage is measured (0: none)",
    )
    ev.add_argument(
        "--coverage-seeds", type=int, default=COVERAGE_SEEDS, help="images of each coverage prompt, seeds 0 .. N-1"
    )
    ev.add_argument("--steps", type=int, nargs="*", help="sampling steps to evaluate masked-diffusion models at")
    ev.add_argument("--features", default=str(DEFAULT_FEATURES))
    ev.add_argument("--json", help="also write the results here")
    ev.add_argument(
        "--tteo-steps", type=int, nargs="*", default=[], help="one-step models: also refine with TTEO for these steps"
    )
    ev.add_argument(
        "--best-of", type=int, nargs="*", default=[], help="one-step models: also best-of-N, alone and with TTEO"
    )
    ev.add_argument("--grid", help="folder for a PNG grid of the first 50 images of each row")
    ev.add_argument("--device", default="auto")
    ev.add_argument(
        "--placement", choices=["grid", "free"], default="grid", help="where the reference images' objects sit"
    )
    ev.add_argument(
        "--sampler", nargs="*", metavar="KEY=VALUE", help="teachers: override sampler settings, e.g. guidance=3"
    )
    ev.add_argument(
        "--precision", choices=list(PRECISIONS), help="sample as the server would with this precision (default fp32)"
    )
    ev.add_argument(
        "--compile", action="store_true", help="sample through the compiled network, as the server would with --compile"
    )
    ev.add_argument(
        "--generator",
        nargs="*",
        metavar="KEY=VALUE",
        help="one-step models: override generator settings, e.g. latent_scale=0.8",
    )
    ev.add_argument(
        "--check",
        nargs="*",
        metavar="KEY=VALUE",
        help="override the draw check, e.g. bar=9.3 proposals=4 (a model with a reward but no check gets one; proposals=1 draws unchecked)",
    )
    ev.add_argument(
        "--tteo",
        nargs="*",
        metavar="KEY=VALUE",
        help="one-step models: override TTEO settings, e.g. target=logits lr=0.05",
    )
    ev.set_defaults(func=_eval)

    from softdimo.editing import DEFAULT_STRENGTH
    from softdimo.edit_evaluation import EDITS

    edits = commands.add_parser(
        "eval-edits",
        help="judge a model's edits: held-out inpainting edits (pass, kept object unchanged, both), with TTEO, and "
        "image-to-image (pass beside layout coverage)",
    )
    edits.add_argument("model", help="a one-step or teacher bundle folder")
    edits.add_argument(
        "--edits", type=int, default=EDITS, help="held-out inpainting edits, and image-to-image inputs, judged"
    )
    edits.add_argument(
        "--tteo-steps", type=int, nargs="*", default=[], help="one-step models: also TTEO on the edits, these steps"
    )
    edits.add_argument(
        "--strength", type=float, default=DEFAULT_STRENGTH, help="image-to-image: the share of tokens repainted"
    )
    edits.add_argument(
        "--coverage-prompts",
        type=int,
        default=COVERAGE_PROMPTS,
        help="image-to-image: the first N held-out prompts whose layout coverage is measured (0: none)",
    )
    edits.add_argument(
        "--coverage-seeds", type=int, default=COVERAGE_SEEDS, help="images of each coverage prompt, seeds 0 .. N-1"
    )
    edits.add_argument("--json", help="also write the results here")
    edits.add_argument("--device", default="auto")
    edits.set_defaults(func=_eval_edits)

    curve = commands.add_parser(
        "curve", help="a training run's evaluations against training time (from its metrics.jsonl)"
    )
    curve.add_argument("runs", nargs="+", help="run folders, e.g. runs/shapes-teacher-text")
    curve.set_defaults(func=_curve)

    gen = commands.add_parser("generate", help="write PNG files for a prompt or class label")
    gen.add_argument("--model", default=str(DEFAULT_MODEL))
    target = gen.add_mutually_exclusive_group(required=True)
    target.add_argument("--prompt")
    target.add_argument("--class-label", type=int)
    gen.add_argument("-n", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, help="sampling steps (masked-diffusion models)")
    gen.add_argument("--out", default="out")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=_generate)

    ref = commands.add_parser(
        "refine", help="TTEO: optimise a one-step model's input against its reward, write PNG files"
    )
    ref.add_argument("--model", default=str(DEFAULT_MODEL))
    target = ref.add_mutually_exclusive_group(required=True)
    target.add_argument("--prompt")
    target.add_argument("--class-label", type=int)
    ref.add_argument("-n", type=int, default=4)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--steps", type=int, help="TTEO steps (default: the model's)")
    ref.add_argument("--lr", type=float, help="TTEO learning rate (default: the model's)")
    ref.add_argument("--best-of", type=int, help=f"candidates per image (default: {REQUEST_BEST_OF}, as over HTTP)")
    ref.add_argument("--target", choices=list(TARGETS), help="what TTEO optimises (default: the model's)")
    ref.add_argument("--reward", help="reward name (default: the model's first)")
    ref.add_argument("--out", default="out")
    ref.add_argument("--device", default="auto")
    ref.set_defaults(func=_refine)

    imp = commands.add_parser(
        "import", help="make a bundle of a checkpoint folder: a diffusers MUSE pipeline or a CLIP model"
    )
    imp.add_argument(
        "format",
        choices=["muse", "clip"],
        help="muse: a folder AmusedPipeline.save_pretrained wrote (a teacher); "
        "clip: a folder CLIPModel and its tokenizer were saved to (a reward)",
    )
    imp.add_argument("source", help="the checkpoint folder (nothing is downloaded)")
    imp.add_argument(
        "out", help="the bundle folder to write; for muse it may be the source itself, made a bundle in place"
    )
    imp.add_argument("--name", required=True, help="the model name the server answers to")
    muse_sampler = MuseSamplerSettings()  # a flag left out takes its value from here
    imp.add_argument("--steps", type=int, help=f"muse: default sampling steps (default: {muse_sampler.steps})")
    guidance_help = f"muse: default guidance_scale, as diffusers counts it (default: {muse_sampler.guidance:g})"
    imp.add_argument("--guidance", type=float, help=guidance_help)
    imp.set_defaults(func=_import)

    add_bench_suite = _add_bench_parser(commands)
    if extend is not None:
        extend(commands, add_bench_suite)
    return parser


def main(argv: list[str] | None = None, extend: Extension | None = None) -> int:
    args = build_parser(extend).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError) as exc:
        from softdimo.bundle import BundleError
        from softdimo.conditioning import ConditionError
        from softdimo.device import DeviceError
        from softdimo.evaluation import EvaluationError
        from softdimo.train.recipe import RecipeError

        if isinstance(exc, (BundleError, ConditionError, DeviceError, EvaluationError, RecipeError)):
            print(f"softdimo: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
