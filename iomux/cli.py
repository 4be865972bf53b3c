"""The command line: serve, backends, probe, check, bench, report merge.

The contract is docs/DESIGN.md section 1. Every error a user can cause ends
here as one line, ``iomux: error: ...``, and an exit status: 2 for usage
(argparse errors included: ``_Parser.error`` raises instead of printing the
usage block), 1 for run-time failures. ``bench``, ``probe``'s behaviour
probes and ``report`` live in modules owned elsewhere; they are imported only
inside their handlers, so a missing one is a one-line error there and never
breaks ``serve``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from iomux import __version__, backends
from iomux.errors import IomuxError, RuntimeFailure, UsageError

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    argparse's HelpFormatter imports shutil for this whenever it is made without a
    width, and argparse makes one per ``add_argument`` (to check the metavar), so
    every ``iomux serve`` paid for shutil and what it imports (fnmatch, bz2, lzma):
    6.5 M of the 105 M instructions from exec to exit of ``serve --stop-on-stdin
    </dev/null`` (callgrind, Debian 12's python3). The same rule: $COLUMNS when it
    is a positive number, else the terminal on stdout, else 80.
    """
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's default formatter, its width found without shutil."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (exit 2), not a usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _lazy_import(module: str, command: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeFailure(f"{command} is not available: cannot import {module} ({exc})") from None


# -- serve ---------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from iomux.server import ServerConfig, serve

    # argparse's dest names are ServerConfig's options, one for one.
    config = ServerConfig(**{name: getattr(args, name) for name in ServerConfig.OPTIONS})
    config.validate()
    mux_cls = backends.get(args.backend)
    if config.workers > 1:
        from iomux.workers import serve_workers

        return serve_workers(config, mux_cls)
    return serve(config, mux_cls)


# -- backends ------------------------------------------------------------------


def _cmd_backends(args: argparse.Namespace) -> int:
    offered = backends.available()
    auto = backends.auto()
    if args.json:
        print(json.dumps({"available": offered, "auto": auto, "known": backends.KNOWN}))
        return 0
    for name in offered:
        cls = backends.BACKENDS[name]
        mark = " (auto)" if name == auto else ""
        trigger = "edge-triggered" if cls.edge_triggered else "level-triggered"
        limit = f", fds below {cls.max_fd}" if cls.max_fd is not None else ""
        print(f"{name}{mark}  {trigger}{limit}")
    return 0


# -- probe ---------------------------------------------------------------------


def _cmd_probe(args: argparse.Namespace) -> int:
    from iomux import facts

    result: Dict[str, Any] = facts.collect()
    selection = args.probes.strip()
    if selection != "none":
        from iomux import probes

        names: Optional[List[str]] = None
        if selection != "all":
            names = [n.strip() for n in selection.split(",") if n.strip()]
            unknown = [n for n in names if n not in probes.PROBES]
            if not names or unknown:
                raise UsageError(
                    f"--probes takes all, none or names among: {', '.join(probes.PROBES)}"
                )
        result["probes"] = probes.run(names)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key, value in result.items():
            if key != "probes":
                print(f"{key}: {json.dumps(value)}")
        if "probes" in result:
            print(f"probes: {', '.join(result['probes'])} (use --json for the observations)")
    return 0


# -- check ---------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    from iomux import check

    return check.main(args.address, args.timeout)


# -- bench, report ---------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    loadgen = _lazy_import("iomux.loadgen", "iomux bench")
    status: int = loadgen.main(args)
    return status


def _cmd_report_merge(args: argparse.Namespace) -> int:
    report = _lazy_import("iomux.report", "iomux report merge")
    status: int = report.merge_main(list(args.paths), args.output)
    return status


# -- the parser ----------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the echo server")
    serve.add_argument("--backend", default="auto", metavar="NAME", help=f"one of {', '.join(backends.KNOWN)} (default auto)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7000, help="port; 0 picks a free one (default 7000)")
    serve.add_argument("--workers", type=int, default=1, metavar="N", help="processes sharing the port (default 1)")
    serve.add_argument("--line-mode", action="store_true", help="echo line by line; an empty line closes the connection")
    serve.add_argument("--idle-timeout", type=_non_negative_float, default=0.0, metavar="S", help="close connections idle this long (default 0: never)")
    serve.add_argument("--max-conns", type=int, default=0, metavar="N", help="refuse connections beyond N open (default 0: no limit)")
    serve.add_argument("--ready-file", metavar="PATH", help="write host, port, backend, pid as JSON once listening")
    serve.add_argument("--high-water", type=int, default=262144, metavar="BYTES", help="stop reading a connection with this much output pending (default 262144)")
    serve.add_argument("--low-water", type=int, default=65536, metavar="BYTES", help="resume reading at or below this much pending (default 65536)")
    serve.add_argument("--drain-timeout", type=_non_negative_float, default=2.0, metavar="S", help="on SIGTERM/SIGINT, wait this long for open connections (default 2)")
    serve.add_argument("--sndbuf", type=int, default=0, metavar="BYTES", help="SO_SNDBUF of each connection (default 0: the kernel's); small values force partial writes")
    serve.add_argument("--stop-on-stdin", action="store_true", help="stop on a line or EOF on standard input")
    serve.add_argument("--quiet", action="store_true", help="only the contract's lines on stderr (no worker restarts or EMFILE notes)")
    serve.set_defaults(handler=_cmd_serve)


def _add_backends(sub: Any) -> None:
    blist = sub.add_parser("backends", help="list the backends this kernel offers")
    blist.add_argument("--json", action="store_true", help='print {"available": [...], "auto": ..., "known": [...]}')
    blist.set_defaults(handler=_cmd_backends)


def _add_probe(sub: Any) -> None:
    probe = sub.add_parser("probe", help="facts of this host (and behaviour probes) for the report")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.add_argument("--probes", default="all", metavar="all|none|NAME,NAME", help="behaviour probes to run (default all)")
    probe.set_defaults(handler=_cmd_probe)


def _add_check(sub: Any) -> None:
    check = sub.add_parser("check", help="one echo round trip; exit 0 on success, 1 on failure")
    check.add_argument("address", metavar="HOST:PORT")
    check.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds for the whole round trip (default 5)")
    check.set_defaults(handler=_cmd_check)


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="load an echo server: requests/s, MB/s, latency p50/p99")
    # Its own arguments, so the two never drift apart. Through _lazy_import, as in
    # the handler: ``from iomux import loadgen`` found the package's attribute
    # when an earlier import had set it, and otherwise raised a traceback.
    loadgen = _lazy_import("iomux.loadgen", "iomux bench")
    loadgen.add_arguments(bench)
    bench.set_defaults(handler=_cmd_bench)


def _add_report(sub: Any) -> None:
    report = sub.add_parser("report", help="cross-OS run reports")
    report_sub = report.add_subparsers(dest="report_command", metavar="COMMAND", parser_class=_Parser)
    merge = report_sub.add_parser("merge", help="merge results.json files from several machines")
    merge.add_argument("paths", nargs="+", metavar="RESULTS.json")
    merge.add_argument("-o", "--output", metavar="OUT.json", help="OUT.json, or a directory (default: ./merged-report/)")
    merge.set_defaults(handler=_cmd_report_merge)


COMMANDS: Dict[str, Callable[[Any], None]] = {
    "serve": _add_serve,
    "backends": _add_backends,
    "probe": _add_probe,
    "check": _add_check,
    "bench": _add_bench,
    "report": _add_report,
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line (docs/DESIGN.md section 1).

    ``command``: the one that is about to be parsed, if known; then only its
    subparser is built. The test suites start some 350 servers per target, on
    kernels where Python starts slowly, and building the other five (bench's
    arguments are iomux.loadgen's, whose import is a fifth of serve's start-up)
    is paid at every start: 6.1 M of the 110.8 M instructions from exec to exit
    of ``serve --stop-on-stdin </dev/null`` (callgrind). An unknown or missing command gets them all, so
    that usage errors and ``--help`` list every command.
    """
    parser = _Parser(prog="iomux", description="An echo server with select, poll, epoll and kqueue backends.")
    parser.add_argument("--version", action="version", version=f"iomux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, add in COMMANDS.items():
        if command not in COMMANDS or name == command:
            add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser takes no option with a value: the first word that is
    # not an option is the command.
    command = next((word for word in words if not word.startswith("-")), None)
    try:
        args = build_parser(command).parse_args(words)
        handler: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "handler", None)
        if handler is None:
            if args.command == "report":
                raise UsageError("report needs a command: merge")
            raise UsageError("a command is needed: serve, backends, probe, check, bench or report")
        return handler(args)
    except IomuxError as exc:
        print(f"iomux: error: {exc.message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `iomux backends | head`: the reader went away; nothing left to say.
        return 0


if __name__ == "__main__":
    sys.exit(main())
