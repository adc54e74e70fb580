"""The ``flowmeter`` command line: parses arguments and calls; holds no logic."""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="flowmeter: an IPFIX (RFC 7011) flow exporter for Linux gateways and overlay networks.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(log_format: str = typer.Option(
        "text", "--log-format", envvar="FLOWMETER_LOG_FORMAT",
        help="log lines as text (with syslog priorities when stderr is the journal) or json, one object per line")
        ) -> None:
    """flowmeter: an IPFIX (RFC 7011) flow exporter for Linux gateways and overlay networks."""
    from flowmeter.ipc.logs import FORMATS, set_format, setup_logging

    if log_format not in FORMATS:
        _fail(f"--log-format: {log_format!r} is not one of {', '.join(FORMATS)}")
    set_format(log_format)
    setup_logging()


def _say(message: str, error: bool = True) -> None:
    """A line of the command's own on stderr: ``flowmeter: message``, or a JSON log line (--log-format json)."""
    from flowmeter.ipc.logs import LOGGER, log_format

    if log_format() == "json":
        logger = logging.getLogger(LOGGER)
        logger.log(logging.ERROR if error else logging.INFO, message)
    else:
        typer.echo(f"flowmeter: {message}" if error else message, err=True)


def _fail(message: str) -> None:
    _say(message)
    raise typer.Exit(1)


@app.command()
def check(profile: Path = typer.Argument(..., help="profile JSON file (its FlowMetadata object)"),
          as_json: bool = typer.Option(False, "--json", help="print the effective settings as JSON")) -> None:
    """Check a profile: print its effective settings, or the one-line error (exit 1)."""
    from .config import ConfigError, load_profile

    try:
        p = load_profile(profile)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.describe())


@app.command()
def settings() -> None:
    """Print every profile setting (FlowMetadata key) with its default and accepted values."""
    from .config import settings_help

    typer.echo(settings_help())


@app.command()
def templates() -> None:
    """Print the templates this exporter sends: ID, element names, IDs and lengths."""
    from exporter.template import default_registry

    typer.echo("\n\n".join(t.describe() for t in default_registry()))


@app.command()
def collect(listen: str = typer.Option("udp/127.0.0.1:4739", "--listen", "-l",
                                       help="udp/HOST:PORT ([IPv6] in brackets) or file/PATH"),
            as_json: bool = typer.Option(False, "--json", help="one JSON object per record"),
            count: Optional[int] = typer.Option(None, "--count", "-c", help="stop after N records"),
            duration: Optional[float] = typer.Option(None, "--duration", help="stop after S seconds")) -> None:
    """Receive IPFIX, decode any template, print records; count gaps and malformed messages."""
    from exporter.collect import collect as run_collect, parse_listen

    try:
        parse_listen(listen)
    except ValueError as exc:
        _fail(str(exc))
    try:
        run_collect(listen, as_json, sys.stdout, count=count, duration=duration)
    except OSError as exc:
        _fail(f"--listen {listen}: {exc.strerror or exc}")


@app.command()
def exporter(profile: Path = typer.Option(..., "--profile", "-p", help="profile JSON file"),
             bind: str = typer.Option(..., "--bind", help="ZeroMQ endpoint to pull record batches from, "
                                      "e.g. ipc:///run/flowmeter/export or tcp://127.0.0.1:5599"),
             producers: Optional[int] = typer.Option(None, "--producers",
                                                     help="exit after end-of-stream from this many producers")) -> None:
    """Run the exporter stage alone: record batches in over ZeroMQ, IPFIX out to the profile's collectors.

    SIGTERM or SIGINT drains and exits; SIGHUP re-reads the profile's collectors and sends templates again.
    """
    from exporter.process import ExporterEndpoints, ExporterHandover, ExporterSettings, run
    from flowmeter.ipc.logs import setup_logging

    from .config import ConfigError, load_profile

    try:
        p = load_profile(profile)
    except ConfigError as exc:
        _fail(str(exc))
    if not p.exporting:
        typer.echo(f"flowmeter: exporting is off ({'Enabled is false' if not p.enabled else 'no IpFixCollectors'}); "
                   "batches are received and dropped", err=True)
    setup_logging("exporter")
    raise typer.Exit(run(ExporterSettings(p.export_settings(), producers), ExporterEndpoints(bind),
                         ExporterHandover(reload=lambda: load_profile(profile).export_settings())))


def _start_up() -> None:
    """A pipeline command: no cyclic garbage collection until the supervisor forks.

    Importing numba and loading the kernels makes hundreds of thousands of
    objects and no garbage worth a collection; the collections the
    interpreter would run meanwhile cost about 0.06 s (a tenth of the
    start-up). The supervisor freezes what exists then and turns collection
    back on, for itself and in every child (``Supervisor.run``).
    """
    gc.disable()


def _load(profile: Optional[Path]):
    from .config import ConfigError, load_profile, parse_profile

    try:
        return load_profile(profile) if profile else parse_profile({"FlowMetadata": {}}, "<defaults>")
    except ConfigError as exc:
        _fail(str(exc))


REPLAY_NICE = 10  # a replay's capture and workers yield the CPU to everything else (see Supervisor)


def _pipeline(p, files: tuple[str, ...], workers: Optional[int], what: str, captures: int = 1,
              stats: Optional[Path] = None, nice: int = 0, live: tuple = ()) -> None:
    from flowmeter.ipc.counters import to_wire

    from .supervisor import Supervisor

    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        _fail(f"{what}: capture file {missing[0]} does not exist")
    if files and captures > len(files):
        _fail(f"{what}: --captures {captures} needs at least {captures} capture files, got {len(files)}")
    sup = Supervisor(p, files, workers, captures=captures, data_plane_nice=nice, live=live)
    code = sup.run()
    if sup.children:  # else nothing started: the error below says why
        for line in sup.report.summary().splitlines():
            _say(line, error=False)
    for e in sup.errors:
        _say(e)
    if stats is not None:
        totals = {role: to_wire(value) for role, value in sup.report.totals().items()}
        try:
            stats.write_text(json.dumps({"wall_s": round(sup.report.elapsed, 3), "exit": code, **totals,
                                         "ended_s": {c.name: c.ended_s for c in sup.children}}, indent=1))
        except OSError as exc:
            _fail(f"--stats {stats}: cannot write: {exc.strerror or exc}")
    raise typer.Exit(code)


@app.command()
def replay(captures: list[Path] = typer.Argument(..., help="pcap or pcapng files, metered in order"),
           profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="profile JSON file"),
           workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, max=64,
                                                 help="shard workers (default: the profile's Workers)"),
           capture_processes: int = typer.Option(1, "--captures", "-c", min=1, max=64,
                                                 help="capture processes; with more than one, the files are "
                                                      "dealt out and read at the same time (files of one time "
                                                      "span, e.g. one per fanout member)"),
           stats: Optional[Path] = typer.Option(None, "--stats", help="write every stage's final counters "
                                                "(JSON) to this file")) -> None:
    """Meter capture files at full speed through the whole pipeline and export the flows.

    Timeouts fire by the capture's own clock, so a replay is deterministic. Every flow is
    flushed at the end; a summary goes to stderr. Exit 1 if a file could not be read to its end.
    """
    _start_up()
    p = _load(profile)
    _pipeline(p, tuple(str(c) for c in captures), workers, "replay", capture_processes, stats, REPLAY_NICE)


@app.command()
def run(profile: Path = typer.Option(..., "--profile", "-p", help="profile JSON file"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, max=64)) -> None:
    """Meter the profile's Sources until SIGTERM/SIGINT (or, with capture files only, their end), then
    drain: every metered flow is exported. Live sources log their counts every 10 s."""
    _start_up()
    p = _load(profile)
    if not p.sources:
        _fail(f"{p.source}: Sources: [] has no source; flowmeter run needs at least one "
              "(pcap:PATH, afpacket:IFACE, nflog:GROUP or feed:ENDPOINT)")
    files = tuple(s.target for s in p.sources if not s.live)
    _pipeline(p, files, workers, "run", live=tuple(s for s in p.sources if s.live))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print the status documents as JSON")) -> None:
    """Show every running ``flowmeter run`` of this user: per source, packets, rate and drops (kernel and ours)."""
    from .status import describe_runs, running_status

    runs = running_status()
    if as_json:
        typer.echo(json.dumps(runs, indent=1))
        return
    if not runs:
        _fail("status: no flowmeter run is running (as this user)")
    typer.echo(describe_runs(runs))


@app.command()
def reload(pid: Optional[int] = typer.Option(None, "--pid", help="the run's pid, as flowmeter status shows it "
                                             "(needed when several runs are running)")) -> None:
    """Apply the profile file again to a running ``flowmeter run`` (the same as SIGHUP to its pid).

    What can change in place changes without losing a cached flow; settings that need a restart, or a
    profile that fails its checks, are named in one line in the run's log and the running profile stays."""
    from .status import running_status

    runs = running_status()
    if pid is not None:
        runs = [r for r in runs if r["pid"] == pid]
    if not runs:
        _fail("reload: no flowmeter run is running (as this user)" + (f" with pid {pid}" if pid else ""))
    if len(runs) > 1:
        _fail(f"reload: {len(runs)} runs are running (pids {', '.join(str(r['pid']) for r in runs)}); "
              "say which with --pid")
    target = runs[0]
    try:
        os.kill(target["pid"], signal.SIGHUP)
    except OSError as exc:
        _fail(f"reload: pid {target['pid']}: {exc.strerror or exc}")
    typer.echo(f"flowmeter: reload sent to pid {target['pid']} (profile {target.get('profile')}); "
               "its log says what changed")


@app.command()
def demo(workers: int = typer.Option(2, "--workers", "-w", min=1, max=64, help="shard workers")) -> None:
    """Replay a capture shipped with flowmeter through the whole pipeline to a loopback collector; print its records."""
    from .demo import run_demo
    from .supervisor import Supervisor

    raise typer.Exit(run_demo(Supervisor, workers))


@app.command()
def keygen(directory: Path = typer.Argument(..., help="directory to write NAME.key and NAME.key_secret in"),
           name: str = typer.Option("feed", "--name", "-n", help="the files' name (default feed)")) -> None:
    """Make a CurveZMQ key pair for a tcp feed: NAME.key (the public key, for the other side) and
    NAME.key_secret (both keys, mode 0600). An existing key is never overwritten."""
    from flowmeter.capture.sources.feed import write_key_pair

    try:
        public_path, secret_path, public = write_key_pair(str(directory), name)
    except ValueError as exc:
        _fail(f"keygen: --name: {exc}")
    except OSError as exc:
        _fail(f"keygen: {exc.filename or directory}: {exc.strerror or exc}")
    typer.echo(f"{secret_path}: the key pair (FeedServerKey of a feed, or an agent's own key; keep it secret)\n"
               f"{public_path}: the public key {public.decode()} (FeedAllowedKeys of a feed, or an agent's "
               "server key)")


def main() -> None:
    from flowmeter.ipc.logs import setup_logging

    setup_logging()  # "flowmeter: ..." for this process; each child sets up its own name
    try:
        app()
    except SystemExit as exc:
        if "numba" in sys.modules:
            # The pipeline ran: skip the interpreter's teardown of numba and LLVM (about half a
            # second of finalizers after the work is done); every child has been joined already.
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


if __name__ == "__main__":
    main()
