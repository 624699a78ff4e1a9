"""``cuepipe`` command line: run, pipelines, check, demo, models.

Exit codes of ``cuepipe run``: 0 done; 1 a stage failed; 2 the request itself is wrong (invalid
pipelines file, unknown pipeline, bad ``--set``, missing input or model); 130 cancelled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.foreground import cancel_on_signals, load_pipelines, run_job
from cuepipe.orchestrator.job import JobState
from cuepipe.orchestrator.pipeline import ConfigError, PipelineFile, describe, missing_resources
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import EXIT_BAD_ARGUMENT, EXIT_FAILED, EXIT_OK, CuepipeError
from cuepipe.stages.protocol import JOB_ID
from cuepipe.stages.sender import parse_address
from cuepipe.stages.stage import job_input

log = logging.getLogger("cuepipe")

def _job_id(text: str) -> str:
    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"job ids are 1-64 of A-Z a-z 0-9 _ . - (no leading dot): {text!r}")
    return text


def _watch(text: str) -> tuple[str, str]:
    name, eq, inbox = text.partition("=")
    if not eq or not name or not inbox:
        raise argparse.ArgumentTypeError(f"expected PIPELINE=INBOX, got {text!r}")
    return name, inbox


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_or_report(path: Path | None) -> PipelineFile | None:
    """The pipelines file, or None after printing why it cannot be used (commands then exit 2)."""
    pipelines, error = load_pipelines(path)
    if pipelines is None:
        print(f"error: {error}", file=sys.stderr)
    return pipelines


def cmd_run(args: argparse.Namespace) -> int:
    pipelines, error = load_pipelines(args.pipelines)
    code, result = run_job(pipelines, args.pipeline, job_input(args.input), args.report, args.set, args.out,
                           args.json, args.keep_work, error, job_id=args.job_id, eof_cancels=args.cancel_on_eof)
    if result is not None and result.state is JobState.DONE and not args.json:
        for path in result.outputs:
            print(path)
    return code


def cmd_batch(args: argparse.Namespace) -> int:
    """``cuepipe batch``: orchestrator/batch.py; exit 0 only when every input succeeded (or was done before)."""
    from cuepipe.orchestrator.batch import BatchError, collect, jobs_allowed, run_batch
    from cuepipe.orchestrator.pipeline import resolve_request
    from cuepipe.orchestrator.terminal import BatchDisplay
    from cuepipe.stages.errors import EXIT_INTERRUPTED
    from cuepipe.stages.sender import EventSender

    pipelines = load_or_report(args.pipelines)
    if pipelines is None:
        return EXIT_BAD_ARGUMENT
    notes: list[str] = []
    try:
        pipeline = resolve_request(pipelines, args.pipeline, args.set)
        inputs = collect(args.inputs, notes)
        if not inputs:
            raise BatchError(f"no inputs found in {', '.join(map(str, args.inputs))}")
    except CuepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    for note in notes:
        print(note, file=sys.stderr)
    jobs = jobs_allowed(pipeline, args.jobs)
    remote = None
    if args.engine == "ray":
        from cuepipe.orchestrator.pipeline import find_file
        from cuepipe.orchestrator.rayjobs import RayExecutor

        try:
            remote = RayExecutor(find_file(args.pipelines).resolve(), args.pipeline, args.set, args.out.resolve(),
                                 pipeline.resource, args.jobs if args.jobs > 1 else None, args.address,
                                 list(args.report) + list(pipeline.report))
        except CuepipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_ARGUMENT
    cancel = threading.Event()
    with (EventSender(list(args.report) + list(pipeline.report)) as sender,
          BatchDisplay(len(inputs), args.json) as display, cancel_on_signals(cancel)):
        def sink(event: Message) -> None:
            sender.emit(event)
            display.show(event)

        try:
            summary = run_batch(pipeline, inputs, args.out, jobs=jobs, force=args.force, sink=sink,
                                on_item=lambda item: display.settled(dataclasses.asdict(item)), cancel=cancel,
                                remote=remote)
        finally:
            if remote is not None:
                remote.close()
    if not args.json:
        print(summary.table())
        print(f"summary: {Path(summary.out) / 'batch_summary.json'}; report: {Path(summary.out) / 'report.html'}")
    if cancel.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.ok else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    """``cuepipe watch``: orchestrator/watch.py; runs until Ctrl-C / SIGTERM (exit 0) or a bad request (2)."""
    from cuepipe.orchestrator.batch import Item, Runner, jobs_allowed
    from cuepipe.orchestrator.pipeline import resolve_request
    from cuepipe.orchestrator.terminal import EventDisplay
    from cuepipe.orchestrator.watch import Watcher, WatchService
    from cuepipe.stages.sender import EventSender

    pipelines = load_or_report(args.pipelines)
    if pipelines is None:
        return EXIT_BAD_ARGUMENT
    try:
        pipeline = resolve_request(pipelines, args.pipeline, args.set)
    except CuepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    if not args.inbox.is_dir():
        print(f"error: the inbox {args.inbox} is not a folder", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    stop = threading.Event()
    with (EventSender(list(args.report) + list(pipeline.report)) as sender, EventDisplay(args.json) as display,
          cancel_on_signals(stop)):
        def sink(event: Message) -> None:
            sender.emit(event)
            display.show(event)

        def settled(item: Item, where: Path) -> None:
            if args.json:
                print(json.dumps({"item": dataclasses.asdict(item), "moved_to": str(where)}), flush=True)
            else:
                print(f"{item.status}: {item.relative} -> {where}" + (f" ({item.kind}: {item.error})"
                                                                         if item.error else ""), flush=True)

        runner = Runner(pipeline, args.out, sink, cancel=stop)
        service = WatchService(Watcher(args.inbox, args.settle, args.polling), runner,
                               jobs_allowed(pipeline, args.jobs), settled)
        print(f"watching {args.inbox.resolve()} for {pipeline.name} -> {runner.out} (Ctrl-C stops)", file=sys.stderr)
        service.serve(stop)
    return EXIT_OK


def cmd_pipelines(args: argparse.Namespace) -> int:
    pipelines = load_or_report(args.pipelines)
    if pipelines is None:
        return EXIT_BAD_ARGUMENT
    if args.json:
        print(json.dumps(describe(pipelines), indent=2))
        return EXIT_OK
    print(f"# {pipelines.path}")
    for p in pipelines.pipelines.values():
        print(f"{p.name:<16} {' -> '.join(s.name for s in p.stages):<40} {p.description}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    pipelines = load_or_report(args.pipelines)
    if pipelines is None:
        return EXIT_BAD_ARGUMENT
    problems: list[str] = []
    for p in pipelines.pipelines.values():
        missing = missing_resources(p)
        problems += missing
        print(f"{'ok     ' if not missing else 'MISSING'} {p.name}")
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # any failure means the same thing to the user: no ffmpeg
        problems.append(f"ffmpeg (imageio-ffmpeg) not usable: {exc}")
    for line in problems:
        print(f"  - {line}", file=sys.stderr)
    print(f"{pipelines.path}: {len(pipelines.pipelines)} pipeline(s), {len(problems)} problem(s)")
    return EXIT_FAILED if problems else EXIT_OK


def _slots(text: str) -> dict[str, int]:
    slots: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, eq, count = item.partition("=")
        if not eq or not name or not count.isdigit():
            raise argparse.ArgumentTypeError(f"expected RESOURCE=COUNT[,...], e.g. cpu=2,gpu=1; got {text!r}")
        slots[name] = int(count)
    return slots


def cmd_serve(args: argparse.Namespace) -> int:
    from cuepipe.orchestrator.daemon import Daemon, DaemonConfig, DaemonError
    from cuepipe.orchestrator.scheduler import RestartPolicy

    pipelines = load_or_report(args.pipelines)
    if pipelines is None:
        return EXIT_BAD_ARGUMENT
    config = DaemonConfig(host=args.host, port=args.port, allow=tuple(args.allow),
                          roots=tuple(Path(r).resolve() for r in args.root), state_dir=args.state,
                          slots=args.slots, max_queue=args.max_queue, policy=RestartPolicy(args.on_restart),
                          warm=tuple(args.warm), watch=tuple((name, Path(inbox), args.watch_out)
                                                             for name, inbox in args.watch))
    try:
        daemon = Daemon(config, pipelines)
    except (DaemonError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc} (another cuepipe serve, or TD, on that "
              "port? choose another with --port)", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    stop = threading.Event()
    with cancel_on_signals(stop):  # before saying it listens: a stop right after that is a polite one
        print(f"cuepipe serve listening on {args.host}:{daemon.socket.port}", flush=True)
        daemon.serve(stop)
    return EXIT_OK


def cmd_supervise(args: argparse.Namespace) -> int:
    from cuepipe.orchestrator.supervisor import Supervisor

    argv = [sys.executable, "-m", "cuepipe.orchestrator.cli"]
    if args.pipelines:
        argv += ["--pipelines", str(args.pipelines.resolve())]
    argv += ["serve", *args.serve_args]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    print(f"supervising: {' '.join(argv[3:])} (log: {args.log})", flush=True)
    with cancel_on_signals(stop):
        return Supervisor(argv, Path.cwd(), args.log.resolve()).run(stop)


def cmd_demo(args: argparse.Namespace) -> int:
    from cuepipe.orchestrator.demo import demo, demo_live

    if args.live:
        return demo_live(out=args.out, seconds=args.seconds, reports=args.report, json_lines=args.json)
    return demo(out=args.out, reports=args.report, json_lines=args.json, pipeline=args.pipeline)


def cmd_models(args: argparse.Namespace) -> int:
    from cuepipe.models.cli import models_command

    return models_command(list(args.rest))


def cmd_styles(args: argparse.Namespace) -> int:
    """Every style of a model with styles (multistyle26) on one picture, as a PNG (they have no names)."""
    from cuepipe.stages.contactsheet import write_png
    from cuepipe.stages.democlip import render_frames
    from cuepipe.stages.generate import style_sheet
    from cuepipe.stages.video import VideoReader

    try:
        if args.image is None:
            image = next(render_frames(640, 360, 1, seed=3))[0]
        else:
            with VideoReader(args.image) as reader:  # a picture, a video or an image folder: its first frame
                image = next(iter(reader))
        print(write_png(args.out, style_sheet(args.model, image)))
    except CuepipeError as exc:  # a model without styles or missing (bad_argument / model_missing), no picture
        print(f"cuepipe styles: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuepipe", description="Run video ML pipelines as supervised stages.")
    parser.add_argument("--pipelines", type=Path, help="pipelines file (default: $CUEPIPE_PIPELINES, "
                        "./pipelines.toml, then the repository's)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline on one input")
    run.add_argument("pipeline")
    run.add_argument("input")
    run.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="override a stage parameter (STAGE: name or index; repeatable)")
    run.add_argument("--report", action="append", default=[], type=_address, metavar="HOST:PORT",
                     help="send Job Events here, e.g. TouchDesigner's OSC In DAT (repeatable)")
    run.add_argument("--out", type=Path, help="output folder (default: the pipeline's 'out')")
    run.add_argument("--json", action="store_true", help="print Events as JSON lines instead of a progress bar")
    run.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    run.add_argument("--job-id", type=_job_id, help="use this job id (default: YYYYMMDD-HHMMSS-xxxx), so a "
                     "caller such as TouchDesigner knows it before the first Event")
    run.add_argument("--cancel-on-eof", action="store_true",
                     help="cancel when standard input closes (how TouchDesigner cancels on Windows; a dying "
                     "parent closes it too)")
    run.set_defaults(func=cmd_run)

    bat = sub.add_parser("batch", help="run a pipeline over many inputs: files, folders, list files (resumable)")
    bat.add_argument("pipeline")
    bat.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                     help="video files, folders (searched recursively) or list files (.txt: one path a line)")
    bat.add_argument("--out", type=Path, required=True, help="output folder; the input folders' tree is mirrored")
    bat.add_argument("--jobs", type=int, default=1, help="Jobs at a time (capped: one per GPU for a gpu "
                     "pipeline, the cores for a cpu one; default 1)")
    bat.add_argument("--force", action="store_true", help="redo inputs already done by this pipeline")
    bat.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="override a stage parameter (part of the pipeline's definition: a change redoes all)")
    bat.add_argument("--report", action="append", default=[], type=_address, metavar="HOST:PORT",
                     help="send every Job's Events here too (repeatable)")
    bat.add_argument("--json", action="store_true", help="JSON lines: every Event, then an item line per input")
    bat.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: run the Jobs on a Ray "
                     "cluster (the optional 'ray' extra; docs/batch.md)")
    bat.add_argument("--address", help="the Ray cluster to join (e.g. ray://head:10001; default: a new local one)")
    bat.set_defaults(func=cmd_batch)

    wat = sub.add_parser("watch", help="run a pipeline on every video dropped into a folder (then done/ or failed/)")
    wat.add_argument("pipeline")
    wat.add_argument("inbox", type=Path)
    wat.add_argument("--out", type=Path, required=True, help="output folder; the inbox's sub-folders are mirrored")
    wat.add_argument("--settle", type=float, default=2.0, help="seconds a file's size and time must stay unchanged "
                     "when no event says it is complete (default 2)")
    wat.add_argument("--polling", action="store_true", help="poll instead of waiting for file-system events "
                     "(network shares: SMB / NFS send none)")
    wat.add_argument("--jobs", type=int, default=1, help="Jobs at a time (capped as for batch)")
    wat.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    wat.add_argument("--report", action="append", default=[], type=_address, metavar="HOST:PORT",
                     help="send every Job's Events here too, e.g. TouchDesigner (repeatable)")
    wat.add_argument("--json", action="store_true", help="JSON lines: every Event, and a line per settled file")
    wat.set_defaults(func=cmd_watch)

    pls = sub.add_parser("pipelines", help="list pipelines and their stages")
    pls.add_argument("--json", action="store_true")
    pls.set_defaults(func=cmd_pipelines)

    chk = sub.add_parser("check", help="validate the pipelines file and report what is missing")
    chk.set_defaults(func=cmd_check)

    srv = sub.add_parser("serve", help="the OSC-controlled job server (docs/protocol.md, Commands)")
    srv.add_argument("--host", default=defaults.DAEMON_HOST, help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=defaults.DAEMON_PORT, help="command port (0: any free port)")
    srv.add_argument("--allow", action="append", default=[], metavar="IP",
                     help="peer allowed to send commands (required when --host is not loopback; repeatable)")
    srv.add_argument("--root", action="append", default=[], metavar="DIR",
                     help="inputs must lie under one of these folders (default: the current folder; repeatable)")
    srv.add_argument("--state", type=Path, default=Path(".cuepipe-state"), help="folder for the job journal")
    srv.add_argument("--slots", type=_slots, default=None, metavar="RES=N,...",
                     help="concurrent jobs per resource (default: cpu=1,gpu=1)")
    srv.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE)
    srv.add_argument("--on-restart", choices=["requeue", "interrupted"], default="requeue",
                     help="what to do with jobs that were running when the daemon died")
    srv.add_argument("--watch", action="append", default=[], type=_watch, metavar="PIPELINE=INBOX",
                     help="also run PIPELINE on every video dropped into INBOX (as `cuepipe watch`; repeatable)")
    srv.add_argument("--watch-out", type=Path, default=None, help="output folder of the watch folders (default: "
                     "the pipeline's out)")
    srv.add_argument("--warm", action="append", default=[], metavar="STAGE",
                     help="start a resident worker for STAGE at once (stages marked warm = true use them)")
    srv.set_defaults(func=cmd_serve)

    sup = sub.add_parser("supervise", help="keep `cuepipe serve` running (exhibitions): restart with backoff")
    sup.add_argument("--log", type=Path, default=Path(".cuepipe-state/serve.log"), help="the daemon's log file")
    sup.add_argument("serve_args", nargs="*", metavar="SERVE_ARG",
                     help="arguments for `cuepipe serve`, after --, e.g. -- --port 9000 --root D:/takes")
    sup.set_defaults(func=cmd_supervise)

    demo = sub.add_parser("demo", help="fetch the model, make a synthetic clip, run the default pipeline")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--pipeline", default=None, help="pipeline to run (default: the embedded default)")
    demo.add_argument("--report", action="append", default=[], type=_address, metavar="HOST:PORT")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--live", action="store_true",
                      help="the live path: the clip as an NDI source, matted live, sent as NDI (needs the ndi extra)")
    demo.add_argument("--seconds", type=float, default=None, help="with --live: stop after this long")
    demo.set_defaults(func=cmd_demo)

    sty = sub.add_parser("styles", help="render every style of a model (multistyle26) on one picture, to choose one")
    sty.add_argument("model", metavar="MODEL", help="a model with styles (cuepipe models list shows which)")
    sty.add_argument("--image", type=Path, metavar="PATH",
                     help="a picture or a video (its first frame); default: the demo figure")
    sty.add_argument("--out", type=Path, default=Path("styles.png"), metavar="PNG", help="default: styles.png")
    sty.set_defaults(func=cmd_styles)

    mdl = sub.add_parser("models", help="list | fetch NAME [NAME ...] | verify: the ONNX model manifest",
                         add_help=False)
    mdl.add_argument("rest", nargs=argparse.REMAINDER)
    mdl.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "supervise":  # everything it does not know is for `cuepipe serve`
        args.serve_args = [a for a in [*args.serve_args, *extra] if a != "--"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
