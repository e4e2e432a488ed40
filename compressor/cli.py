"""The `compress` command: a thin layer over recipe -> plan -> pipeline."""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor import distributed
from compressor.errors import CompressorError, RecipeError, RecipeErrors
from compressor.export import export_check
from compressor.graph_pass import (
    OUTPUT,
    format_shape,
    node_module_path,
    node_shape,
    original_output,
    tapped,
)
from compressor.plugin_manager import AUTOLOAD_ENV
from compressor.recipe import Recipe
from compressor.recipe_chain import Chain
from compressor.recipe_file import load_recipe
from compressor.registry import Registry
from compressor.run_folder import check_output

if TYPE_CHECKING:
    from compressor.step import DistillPlan

EXAMPLES = f"""\
examples:
  compress examples/digits/recipe.yaml                 train, export and report
  compress examples/digits/recipe.yaml train.steps=50  override any recipe key
  compress examples/digits/recipe.yaml --resume        continue a killed run
  compress examples/digits/recipe.yaml --nproc 2       data-parallel on 2 processes
  compress validate examples/digits/recipe.yaml        check a recipe without training
  compress graph examples/digits/recipe.yaml -o g.txt  show both graphs after all passes
  compress plugins                                     list plugins and what they provide
  compress -p no:myplugin plugins                      disable one plugin

set {AUTOLOAD_ENV}=1 to load only compressor's own plugins (plus any -p NAME).
--traceback (anywhere) prints, with an error, the traceback that led to it.
"""

COMMANDS = ("run", "validate", "graph", "plugins", "bench")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-p",
        dest="plugins",
        action="append",
        default=[],
        metavar="NAME",
        help="load plugin NAME (entry point or module); -p no:NAME disables one",
    )
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Distil a teacher into a smaller, verified, exported student from one YAML recipe.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run", parents=[common], help="train, export and report (the default command)"
    )
    validate = sub.add_parser(
        "validate", parents=[common], help="check a recipe fully without training"
    )
    graph = sub.add_parser("graph", parents=[common], help="print both graphs after all passes")
    sub.add_parser(
        "plugins", parents=[common], help="list plugins, their origin and what they provide"
    )
    for p in (run, validate, graph):
        p.add_argument("recipe", type=Path, help="the recipe YAML file")
        p.add_argument(
            "overrides", nargs="*", metavar="key.path=value", help="override recipe keys"
        )
    run.add_argument(
        "--resume", action="store_true", help="continue from the run folder's last checkpoint"
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel on N processes of this machine (starts torchrun for you)",
    )
    graph.add_argument("-o", "--output", type=Path, help="also write the listing to this file")
    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="time teacher, student and every exported artifact on every backend here",
    )
    bench.add_argument("target", type=Path, help="a finished run folder, or its recipe")
    bench.add_argument(
        "--backend", action="append", help="only these (pytorch, onnxruntime-cpu, ...)"
    )
    bench.add_argument("--batch-sizes", type=_int_list, help="e.g. 1,32 (default: the recipe's)")
    bench.add_argument("--tokens", type=int, help="text models: tokens per sample")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    bench.add_argument("--iterations", type=int, help="calls per candidate per round")
    bench.add_argument(
        "--duration", type=float, default=0.5, help="seconds per candidate per round (default)"
    )
    return parser


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 1,32") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch sizes like 1,32")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (
        argv
        and not any(a in COMMANDS for a in argv)
        and not any(a in ("-h", "--help") for a in argv)
    ):
        argv.insert(0, "run")
    # `-p NAME` and KEY=VALUE overrides may sit anywhere (argparse would let a subcommand's
    # defaults drop a `-p` given before it), so both are taken out before parsing.
    plugins, rest = _take_plugin_options(argv)
    # --traceback, anywhere: an error also prints the traceback that led to it
    show_traceback = "--traceback" in rest
    rest = [a for a in rest if a != "--traceback"]
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    args = build_parser().parse_args([a for a in rest if a not in overrides])
    args.overrides, args.plugins = overrides, plugins
    if args.command is None:
        build_parser().print_help()
        return 0
    try:
        disabled = [p.removeprefix("no:") for p in args.plugins if p.startswith("no:")]
        enabled = [p for p in args.plugins if not p.startswith("no:")]
        registry = Registry.load(disabled, enabled)
        if args.command == "plugins":
            print(describe_plugins(registry))
            return 0
        if args.command == "bench":
            from compressor.bench.deploy import bench

            out, text = bench(
                args.target,
                registry,
                args.batch_sizes,
                args.tokens,
                args.backend,
                args.rounds,
                args.iterations,
                args.duration,
            )
            print(text + f"\nwritten: {out / 'bench.md'}, bench.json, bench.png")
            return 0
        recipe = load_recipe(args.recipe, args.overrides, registry)
        chain = Chain(recipe, registry)  # the recipes its models come from, resolved once
        if args.command == "validate":
            check_output(recipe)  # what the run would refuse first
            print(
                "\n".join([describe_plan(recipe, registry, chain), *check_chain(chain, registry)])
            )
            return 0
        if args.command == "graph":
            text = describe_graphs(recipe, registry, chain)
            print(text)
            if args.output:
                args.output.write_text(text + "\n")
            return 0
        if args.nproc is not None:
            return launch(args.nproc, argv)
        from compressor.pipeline import run, run_chain

        run_chain(chain, registry, not args.quiet)  # recipes not yet run, first
        summary = run(
            recipe, registry, args.resume, args.overwrite, not args.quiet, args.overrides, chain
        )
        if distributed.current().leader:
            print(summarize(summary.report, summary.run_dir))
        return 0
    except (RecipeError, RecipeErrors) as exc:
        _print_error(exc, show_traceback)
        return 2
    except CompressorError as exc:
        _print_error(exc, show_traceback)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.leave()


def _print_error(exc: Exception, show_traceback: bool) -> None:
    if show_traceback:
        print("".join(traceback.format_exception(exc)), file=sys.stderr, end="")
    print(f"error{_rank()}: {exc}", file=sys.stderr)


def _rank() -> str:
    """Which rank speaks, in a run of several."""
    world = distributed.current()
    return f" (rank {world.rank} of {world.size})" if world.size > 1 else ""


def launch(nproc: int, argv: list[str]) -> int:
    """`compress RECIPE --nproc N`: the same command under torchrun, N ranks on this machine."""
    if nproc < 1:
        print("error: --nproc takes a number of processes >= 1", file=sys.stderr)
        return 2
    rest, words = [], iter(argv)
    for word in words:
        if word == "--nproc":
            next(words, None)
        elif not word.startswith("--nproc="):
            rest.append(word)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "compressor", *rest]
    code = subprocess.call(command)
    if code != 0:
        print(
            f"error: the run on {nproc} processes failed; torchrun's summary above names the "
            "rank that failed first. The last good checkpoint stays: continue with --resume, "
            "on any number of processes",
            file=sys.stderr,
        )
    return code


def _take_plugin_options(argv: list[str]) -> tuple[list[str], list[str]]:
    plugins: list[str] = []
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-p":
            plugins.append(next(words, ""))
        elif word.startswith("-p") and not word.startswith("--"):
            plugins.append(word[2:])
        else:
            rest.append(word)
    return plugins, rest


def describe_plugins(registry: Registry) -> str:
    lines = []
    for info in registry.plugins:
        plugin = registry.pm.get_plugin(info.name)
        hooks = sorted(h.name for h in registry.pm.get_hookcallers(plugin) or [])
        lines.append(f"{info.name}  ({info.origin}; {info.module})")
        for kind, names in sorted(registry.provided_by(info.name).items()):
            lines.append(f"    {kind.replace('_', ' ')}: {', '.join(sorted(names))}")
            for name in sorted(names):
                summary = registry.components[kind][name].cls.summary()
                lines.append(f"      {name}: {summary}" if summary else f"      {name}")
        lines.append(f"    hooks: {', '.join(hooks)}")
    return "\n".join(lines)


def check_chain(chain: Chain, registry: Registry) -> list[str]:
    """Validate every recipe of the chain not yet run (with the models it takes from other
    recipes untrained); a line per recipe saying what was found."""
    from compressor.plan import plan_stages

    lines = []
    for link in chain.links:
        places = [".".join(map(str, at)) for at in (link.model_at, *link.also_at)]
        run_dir = link.finished()
        if run_dir is not None:
            lines += [f"{where}: the finished run {run_dir}" for where in places]
            continue
        plan_stages(link.recipe, registry, chain, untrained_ok=True)  # once, however named
        lines += [
            f"{where}: {link.recipe.path} has not run; it is valid, and `compress` trains it "
            "first (this recipe was checked with its student untrained)"
            for where in places
        ]
    return lines


def describe_plan(recipe: Recipe, registry: Registry, chain: Chain) -> str:
    from compressor.plan import plan_stages

    lines = [f"recipe {recipe.path}: valid"]
    for name, plan in plan_stages(recipe, registry, chain, untrained_ok=True):
        if name:
            lines.append(f"stage {name}: {plan.recipe.train.steps} steps")
        lines += _describe_stage(plan)
    return "\n".join(lines)


def _describe_stage(plan: DistillPlan) -> list[str]:
    recipe = plan.recipe
    lines = [f"  data: {len(plan.data.train)} train / {len(plan.data.eval)} eval samples"]
    for role, module in (("teacher", plan.teacher), ("student", plan.student)):
        if module is not None:
            params = sum(p.numel() for p in module.parameters())
            lines.append(f"  {role}: {type(module).__name__}, {params:,} parameters, captured")
    graphs = {"student": plan.student_graph, "teacher": plan.teacher_graph}
    for bound in plan.losses:
        reads = []
        for role, names in bound.term.reads().items():
            gm = graphs[role]
            if gm is None:
                continue
            for name in names:
                node = original_output(gm) if name == OUTPUT else tapped(gm)[name]
                reads.append(f"{role}.{name} -> node {node.name} {_shape_text(node_shape(node))}")
        lines.append(f"  loss {bound.label} (weight {bound.weight}): " + "; ".join(reads))
    lines += [f"  {note}" for note in plan.notes]
    lines.append(f"  exporters: {', '.join(s.name for s in recipe.export) or 'none'}")
    return lines


def describe_graphs(recipe: Recipe, registry: Registry, chain: Chain) -> str:
    from compressor.plan import plan_stages

    out = []
    for stage, plan in plan_stages(recipe, registry, chain, untrained_ok=True):
        out += _describe_graphs(plan, f"stage {stage}: " if stage else "")
    return "\n".join(out)


def _describe_graphs(plan: DistillPlan, prefix: str) -> list[str]:
    out = []
    for role, gm in (("teacher", plan.teacher_graph), ("student", plan.student_graph)):
        if gm is None:
            continue
        taps = {node.name: name for name, node in tapped(gm).items()}
        out.append(f"== {prefix}{role} graph ({len(gm.graph.nodes)} nodes) ==")
        out += [
            f"   {note.removeprefix(role + ': ')}"
            for note in plan.notes
            if note.startswith(role + ":")
        ]
        out.append(f"{'node':<28} {'op':<14} {'target':<32} {'module':<36} shape")
        for node in gm.graph.nodes:
            target = str(node.target).removeprefix("aten.")
            shape = _shape_text(node_shape(node), batch=node.op != "get_attr")
            mark = f"  <- tap {taps[node.name]!r}" if node.name in taps else ""
            out.append(
                f"{node.name:<28} {node.op:<14} {target[:32]:<32} {node_module_path(node)[:36]:<36} "
                f"{shape}{mark}"
            )
        out.append("")
    return out


def _shape_text(shape: tuple[Any, ...] | None, batch: bool = True) -> str:
    """A value's shape with its batch dimension as N; a weight's (get_attr) as it is."""
    if shape is None:
        return ""
    if not batch:
        return "[" + ", ".join(str(d) for d in shape) + "]"
    return format_shape(shape)


def summarize(report: dict[str, Any], run_dir: Path) -> str:
    models = report["models"]
    lines = [f"warning: {text}" for text in report.get("warnings", [])]
    lines.append(f"run folder: {run_dir}")
    for role in ("teacher", "student", "baseline"):
        if role in models:
            q = models[role]["quality"]
            lines.append(f"  {role:<9} " + ", ".join(f"{k} {v:.4f}" for k, v in q.items()))
    if "distillation_gain" in report:
        lines.append(
            f"  distillation gain: {report['distillation_gain']['accuracy'] * 100:+.2f} accuracy points"
        )
    for e in report["exports"]:
        lines.append(f"  {e.get('label', e['exporter'])}: {e['path']} {export_check(e)}")
    lines.append(f"  report: {run_dir / 'report.md'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
