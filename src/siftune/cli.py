"""The ``siftune`` command: train, merge, info.

    siftune train --config examples/demo.yaml --steps 100
    siftune info runs/demo
    siftune merge runs/demo merged/ [--base-model PATH]
    siftune bench --task classification --quick

Every error siftune raises on purpose is printed as one line and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
import warnings
from pathlib import Path

from . import __version__
from .errors import ConfigError, DistributedError, SiftError


def _flag_type(field: dataclasses.Field):
    hint = str(field.type)
    if "list" in hint:
        return "list"
    for name, kind in (("bool", "bool"), ("float", float), ("int", int)):
        if hint.startswith(name) or hint == name:
            return kind
    return str


def field_docs(*classes) -> dict[str, str]:
    """Each field's entry in the ``Args:`` sections of the classes' docstrings, as plain text.

    An entry is a line ``name: text`` indented one level below ``Args:``, with
    deeper-indented lines continuing it; later classes' entries win. This is
    where every flag's help comes from, so ``--help`` says what the docs say.
    """
    docs: dict[str, str] = {}
    for cls in classes:
        lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
        if "Args:" not in lines:
            continue
        name = None
        for line in lines[lines.index("Args:") + 1:]:
            if line.strip() and not line.startswith(" "):
                break  # the section ends at the next unindented paragraph
            entry = re.match(r" {4}(\w+): (.*)", line)
            if entry:
                name = entry[1]
                docs[name] = entry[2]
            elif name and line.strip():
                docs[name] += " " + line.strip()
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """reStructuredText markup off: ``x`` and :class:`X` read as x and X."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from .config import SiftConfig
    from .recipes.train import TrainArgs

    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the keys below, spelled as the "
                        "flags or with underscores; flags given as well override it")
    docs = field_docs(SiftConfig, TrainArgs)
    for field in dataclasses.fields(TrainArgs):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        help_text = _help(docs[field.name])
        if kind == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, dest=field.name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS, help=help_text)


def train_args_from(namespace: argparse.Namespace):
    """TrainArgs from defaults, then the YAML file, then explicit flags."""
    from .recipes.train import TrainArgs

    values: dict[str, typing.Any] = {}
    sources: dict[str, str] = {}  # field -> the YAML file its value came from, for error messages
    if getattr(namespace, "config", None):
        values.update(_read_yaml(Path(namespace.config)))
        sources = dict.fromkeys(values, str(namespace.config))
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    flags = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(flags)
    for key in flags:
        sources.pop(key, None)
    for key in ("target_modules", "dense_modules"):
        if isinstance(values.get(key), list) and len(values[key]) == 1 and isinstance(values[key][0], str) \
                and any(c in values[key][0] for c in "*^$|("):
            values[key] = values[key][0]  # a single pattern with regex characters is a regex
    args = TrainArgs.from_dict(values, source=getattr(namespace, "config", None) or "flags")
    args.validate(sources)
    return args


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_strict_loader())  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}, line {exc.line}: key {exc.key!r} is given twice (the first at line "
                          f"{exc.first_line}); keep one") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): _yaml_number(v) for k, v in data.items()}


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


def _strict_loader():
    """PyYAML's SafeLoader, but a key given twice in one mapping is an error, not a silent last-wins."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                if isinstance(key, typing.Hashable):
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _yaml_number(value):
    """``2e-4`` as the number users mean: YAML 1.1 (PyYAML) reads a float without a dot as text."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def cmd_train(ns: argparse.Namespace) -> int:
    from .recipes.train import run

    run(train_args_from(ns), progress=not ns.quiet)
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    from .artifacts.increment import SparseIncrement

    summary = SparseIncrement.load(ns.increment).summary()
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"increment      {ns.increment}")
    print(f"base model     {summary['base_model']}")
    print(f"selected       {summary['selected_components']:,} of {summary['targeted_components']:,} "
          f"targeted components (density {summary['density']:.4%})")
    print(f"dense          {summary['dense_components']:,} components in {summary['dense_tensors']} tensors")
    print(f"size           {summary['tensor_bytes'] / 1e6:.3f} MB of tensor data")
    mode = summary["config"].get("mode", "?")
    print(f"mode           {mode}, {summary['targeted_tensors']} targeted tensors")
    if ns.tensors:
        for name, row in summary["tensors"].items():
            print(f"  {name:60s} {str(row['shape']):>14s} {row['selected']:>9,}  max|d| {row['abs_max']:.3g}")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from .artifacts.increment import SparseIncrement, check_destination

    # Before anything is loaded: a refused output costs no time.
    check_destination(ns.output, ns.overwrite, {"the increment being merged": Path(ns.increment)}, "--overwrite")
    increment = SparseIncrement.load(ns.increment)
    out = increment.merge(ns.output, base_model=ns.base_model, overwrite=ns.overwrite)
    print(f"merged {ns.increment} into {out}/ (loads with transformers' from_pretrained)")
    return 0


def _add_analysis_flags(parser: argparse.ArgumentParser, args_class) -> None:
    """One flag per field of an analysis arguments dataclass, defaulting to the field's default."""
    docs = field_docs(*reversed(args_class.__mro__))
    for field in dataclasses.fields(args_class):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        help_text = field.metadata.get("help") or _help(docs[field.name])
        if "default" not in help_text.lower():
            help_text = help_text.rstrip(".") + " (default: %(default)s)"
        if kind == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, dest=field.name, nargs="+", default=field.default, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=field.default, help=help_text)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_analyze(ns: argparse.Namespace) -> int:
    from . import analysis
    from .analysis import report

    if ns.analysis == "gradients":
        args_class, run, summary = analysis.GradientArgs, analysis.analyze_gradients, report.gradients_summary
    elif ns.analysis == "selection":
        args_class, run, summary = analysis.SelectionArgs, analysis.analyze_selection, analysis.selection.summary
    else:
        args_class, run, summary = analysis.LandscapeArgs, analysis.analyze_landscape, report.landscape_summary
    names = {field.name for field in dataclasses.fields(args_class)}
    args = args_class(**{key: value for key, value in vars(ns).items() if key in names})
    result = run(args, progress=not ns.quiet)
    print(summary(result))
    print(f"wrote {args.output_dir}/{ns.analysis}.json, .md and figures ({result['seconds']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siftune", description="Sparse increment fine-tuning (SIFT).")
    parser.add_argument("--version", action="version", version=f"siftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a sparse increment")
    _add_train_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="summarise an increment folder")
    info.add_argument("increment", help="folder with increment.safetensors + increment_config.json")
    info.add_argument("--tensors", action="store_true", help="one line per targeted tensor")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)

    merge = sub.add_parser("merge", help="write base model + increment as a plain transformers folder")
    merge.add_argument("increment", help="folder with increment.safetensors + increment_config.json")
    merge.add_argument("output", help="folder to write the merged model to")
    merge.add_argument("--base-model", help="base model name or path (default: the one the increment records)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an output folder that is not empty (or a file), once the merged folder is "
                            "complete; never the increment's or base model's folder, nor the current one")
    merge.set_defaults(func=cmd_merge)

    from .analysis import GradientArgs, LandscapeArgs, SelectionArgs

    analyze = sub.add_parser("analyze", help="evidence for SIFT: gradient sparsity, selections, loss landscapes")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    gradients = kinds.add_parser("gradients", help="how much of the gradient norm the top components hold")
    _add_analysis_flags(gradients, GradientArgs)
    selection = kinds.add_parser("selection", help="where each selection's components sit in the weights, and "
                                                   "the rank of what they train to")
    _add_analysis_flags(selection, SelectionArgs)
    landscape = kinds.add_parser("landscape", help="loss along random filter-normalised directions")
    _add_analysis_flags(landscape, LandscapeArgs)
    analyze.set_defaults(func=cmd_analyze)

    from .bench.runner import add_parser as add_bench_parser

    add_bench_parser(sub)  # siftune bench: the side-by-side benchmark

    from .estimate.command import add_parser as add_estimate_parser

    add_estimate_parser(sub)  # siftune estimate: will it fit, simulated without a GPU
    return parser


def _quiet_transformers() -> None:
    """The command prints its own summary; transformers' load reports would bury it."""
    import os

    if not os.environ.get("SIFTUNE_VERBOSE"):
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()


def _exit_without_teardown(code: int) -> None:
    """End a process whose job lost a peer now: tearing down a process group with a dead peer can
    abort (gloo), which would turn the one-line error's exit code 2 into SIGABRT."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# Optional packages log these at import, about kernels siftune does not use: torchao's compiled extensions
# built for other GPUs, torch's notice on torchao's enum registration, bitsandbytes' optional CPU kernel.
_IMPORT_NOISE = {
    "torchao": "Failed to load ",
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


def _quiet_imports() -> None:
    """Drop exactly the import-time log lines of _IMPORT_NOISE; everything else those packages log stays."""
    import logging

    for name, start in _IMPORT_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, start=start: not str(record.msg).startswith(start))


def _says_first(exc: SiftError) -> bool:
    """Whether this process prints ``exc``: under a launcher, an error met before the job's processes
    joined (bad flags, a refused output folder) is every process's alike, and only rank 0 says it."""
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    return joined or os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    parser = build_parser()
    ns = parser.parse_args(argv)
    _quiet_transformers()
    # Warnings one line each, in the command's voice, as its errors are: not the Python source line.
    # (catch_warnings does not restore formatwarning: put back by hand.)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"siftune {ns.command}: warning: {message}\n"
    try:
        return ns.func(ns)
    except SiftError as exc:
        if _says_first(exc):
            print(f"siftune {ns.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, DistributedError):
            _exit_without_teardown(2)
        return 2
    except KeyboardInterrupt:
        print(f"siftune {ns.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
