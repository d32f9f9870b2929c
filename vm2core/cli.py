"""Command line: maps arguments to a saved-state reader and a sink; owns messages and exit codes.

Exit codes (also in README and ``--help``):
  0  success
  1  the core could not be written (output exists, terminal, disk full, broken pipe, network)
  2  bad or unsupported input, or bad usage
  3  internal error (a bug: please report it; VM2CORE_DEBUG=1 shows the traceback)
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from vm2core import __version__
from vm2core.core.convert import Progress, convert
from vm2core.errors import OutputError, Vm2coreError
from vm2core.progress import LogProgress, TerminalProgress, human_bytes
from vm2core.reader.savedstate import SavedState
from vm2core.sinks.base import Sink
from vm2core.sinks.file import StdoutSink, open_output, remove_pending_outputs
from vm2core.sinks.hashing import HashingSink
from vm2core.sinks.zstd import DEFAULT_LEVEL, ZSTD_SUFFIXES, ZstdSink

KDUMP_CODECS = ["zlib", "zstd", "snappy", "none"]     # vm2core.core.kdump.CODECS (imported lazily)

EXIT_OK, EXIT_OUTPUT, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """\b
Exit codes: 0 success; 1 the core could not be written; 2 bad or unsupported input or usage;
3 internal error (VM2CORE_DEBUG=1 shows a traceback); 130 interrupted.
\b
Examples:
  vm2core GUEST.vmrs GUEST.core
  vm2core GUEST.vmrs - | zstd > GUEST.core.zst
  vm2core info GUEST.vmrs
"""


def _err(message: str) -> None:
    click.echo(f"vm2core: {message}", err=True)


class _Reporter:
    """What the user sees on stderr: messages unless -q, progress when asked or on a terminal."""

    def __init__(self, quiet: bool, progress: bool | None) -> None:
        self.quiet = quiet
        tty = sys.stderr.isatty()
        show = (tty if progress is None else progress) and not quiet
        self.progress: Progress = (TerminalProgress() if tty else LogProgress()) if show else Progress()

    def say(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            _err(f"warning: {message}")


def _run(func: Any, *args: Any, **kwargs: Any) -> None:
    """Turn every failure into one line and an exit code."""
    try:
        func(*args, **kwargs)
    except Vm2coreError as e:
        _err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        remove_pending_outputs()
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _err("output closed early (broken pipe)")
        sys.exit(EXIT_OUTPUT)
    except Exception as e:  # a bug: still no traceback unless asked for
        if os.environ.get("VM2CORE_DEBUG"):
            raise
        _err(f"internal error: {type(e).__name__}: {e} (VM2CORE_DEBUG=1 shows the traceback)")
        sys.exit(EXIT_INTERNAL)


class _DefaultGroup(click.Group):
    """``vm2core INPUT OUTPUT`` means ``vm2core convert INPUT OUTPUT``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="vm2core")
def main() -> None:
    """Convert a Hyper-V saved state (.vmrs) of a Linux guest into an ELF vmcore for crash and drgn.

    \b
    vm2core INPUT OUTPUT        convert (OUTPUT "-" = standard output)
    vm2core info INPUT          describe the saved state and the guest kernel in it
    vm2core inspect INPUT       list the raw keys of any HyperVStorage file
    """


@main.command("convert", epilog=EPILOG)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUTPUT", type=str, required=False)
@click.option("-f", "--force", is_flag=True,
              help="Overwrite OUTPUT (or the remote file) if it exists; allow a terminal as stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress on stderr (default: only when stderr is a terminal).")
@click.option("--exclude-zero", is_flag=True,
              help="Leave runs of >= 256 zero pages out of the core (split PT_LOADs, like makedumpfile -E).")
@click.option("--zstd", "zstd_level", type=int, is_flag=False, flag_value=3, default=None, metavar="[LEVEL]",
              help="Compress with zstd (all cores; level 3 unless given as --zstd=LEVEL). "
                   "Implied by an OUTPUT ending in .zst.")
@click.option("--ssh", "ssh_target", metavar="[USER@]HOST:PATH",
              help="Upload over SFTP instead of writing a local file (also ssh://user@host:port/path).")
@click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE",
              help="Like ssh -o: Port, User, IdentityFile, UserKnownHostsFile, StrictHostKeyChecking, "
                   "ConnectTimeout... (repeatable).")
@click.option("--ssh-accept-new", is_flag=True,
              help="Accept and record an unknown host key (never a changed one), like OpenSSH's accept-new.")
@click.option("--verify", is_flag=True,
              help="With --ssh: compare a SHA-256 of the streamed bytes with the uploaded file's.")
@click.option("--sha256", "want_sha256", is_flag=True,
              help="Print the SHA-256 of the bytes written (and write OUTPUT.sha256 for a file).")
@click.option("--format", "out_format", type=click.Choice(["elf", "kdump"]), default=None,
              help="elf (default): an ELF vmcore, read by every tool. kdump: makedumpfile's kdump-compressed "
                   "format, pages compressed one by one, opened in place by crash and drgn (no decompressing); "
                   "implied by an OUTPUT ending in .kdump. To standard output or a pipe it is written in "
                   "makedumpfile's flattened form (crash reads it; makedumpfile -R makes the file form).")
@click.option("--compress", "compress", type=click.Choice(KDUMP_CODECS), default=None,
              help="Page compression of --format kdump (default zlib, read by every crash and drgn build). "
                   "zstd: smaller and faster; needs crash >= 7.3.1 built with zstd (Debian, Fedora and RHEL "
                   "packages are; plain upstream `make` is not) or drgn's PyPI wheels / libkdumpfile >= 0.5.0 "
                   "with zstd. snappy: needs the optional package cramjam and a crash built with snappy. "
                   "none: raw pages. LZO is not offered (no maintained Python package with wheels).")
def convert_cmd(input_path: Path, output: str | None, force: bool, quiet: bool, progress: bool | None,
                exclude_zero: bool, zstd_level: int | None, ssh_target: str | None, ssh_options: tuple[str, ...],
                ssh_accept_new: bool, verify: bool, want_sha256: bool, out_format: str | None,
                compress: str | None) -> None:
    """Convert INPUT (.vmrs) into an ELF core at OUTPUT ("-" for standard output) or on a remote host.

    A local core is written to a temporary file beside OUTPUT and renamed when complete; an
    upload goes to PATH.partial and is renamed when complete. The core carries one PT_LOAD per
    guest RAM range, NT_PRSTATUS and QEMU-style CPU notes for every virtual processor, and the
    guest kernel's own VMCOREINFO note, so `crash vmlinux OUTPUT` and `drgn -c OUTPUT` need no
    extra options. With --format kdump (or OUTPUT ending in .kdump) the same contents are written
    in makedumpfile's kdump-compressed format, which crash and drgn open without decompressing.
    """
    if (output is None) == (ssh_target is None):
        raise click.UsageError("give either OUTPUT or --ssh [USER@]HOST:PATH (not both)")
    if verify and ssh_target is None:
        raise click.UsageError("--verify checks an upload: use it with --ssh (for a local file use --sha256)")
    name = (output if output not in (None, "-") else ssh_target) or ""
    bare = name.lower()
    for suffix in ZSTD_SUFFIXES:
        bare = bare[:-len(suffix)] if bare.endswith(suffix) else bare
    out_format = out_format or ("kdump" if bare.endswith(".kdump") else "elf")   # (.kdump.zst: refused below)
    if out_format == "kdump":
        if zstd_level is not None or name.lower().endswith(ZSTD_SUFFIXES):
            raise click.UsageError("--format kdump compresses every page itself: a --zstd (.zst) stream around "
                                   "it gains nothing and crash could not open it; use --compress zstd")
        if exclude_zero:
            raise click.UsageError("--exclude-zero is for ELF cores: a kdump core always stores zero pages as "
                                   "one shared page")
        _run(_convert_kdump, input_path, output, force=force, quiet=quiet, progress=progress,
             compress=compress or "zlib", ssh_target=ssh_target, ssh_options=ssh_options,
             accept_new=ssh_accept_new, verify=verify, want_sha256=want_sha256)
        return
    if compress is not None:
        raise click.UsageError("--compress chooses the page compression of --format kdump (for an ELF core "
                               "use --zstd)")
    if output is not None and zstd_level is None and output != "-" and output.lower().endswith(ZSTD_SUFFIXES):
        zstd_level = DEFAULT_LEVEL
    _run(_convert, input_path, output, force=force, quiet=quiet, progress=progress, exclude_zero=exclude_zero,
         zstd_level=zstd_level, ssh_target=ssh_target, ssh_options=ssh_options, accept_new=ssh_accept_new,
         verify=verify, want_sha256=want_sha256)


def _open_sink(output: str | None, force: bool, input_path: Path, ssh_target: str | None,
               ssh_options: tuple[str, ...], accept_new: bool, verify: bool) -> Sink:
    if ssh_target is not None:
        from vm2core.sinks.sftp import open_sftp_sink

        return open_sftp_sink(ssh_target, ssh_options=ssh_options, force=force, accept_new=accept_new,
                              verify=verify)
    assert output is not None
    if output == "-":
        return StdoutSink(force=force)
    target = Path(output)
    try:
        if target.exists() and target.resolve() == input_path.resolve():
            raise OutputError(f"{target}: output is the input file")
    except OSError:
        pass
    try:
        mode = input_path.stat().st_mode & 0o666
    except OSError:
        mode = None
    return open_output(target, force=force, mode=mode)


def _convert(input_path: Path, output: str | None, *, force: bool, quiet: bool, progress: bool | None,
             exclude_zero: bool, zstd_level: int | None, ssh_target: str | None, ssh_options: tuple[str, ...],
             accept_new: bool, verify: bool, want_sha256: bool) -> None:
    rep = _Reporter(quiet, progress)
    with SavedState.open(input_path) as state:
        if state.dirty:
            rep.warn(f"{input_path}: the replay log holds uncommitted changes; memory may be incomplete")
        base = _open_sink(output, force, input_path, ssh_target, ssh_options, accept_new, verify)
        # The digest covers the bytes that reach the output (compressed ones with --zstd).
        hashing = HashingSink(base) if want_sha256 else None
        sink: Sink = hashing or base
        if zstd_level is not None:
            sink = ZstdSink(sink, level=zstd_level)
        try:
            result = convert(state, sink, progress=rep.progress, warn=rep.warn, exclude_zero=exclude_zero)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    k = result.selection.kernel
    if k is not None:
        pb = "unknown" if k.phys_base is None else f"{k.phys_base:#x}"
        rep.say(f"guest kernel {k.osrelease}, KERNELOFFSET={k.kernel_offset or 0:#x}, phys_base={pb}")
    stored = base.position
    size = human_bytes(result.bytes_written) + (f" ({human_bytes(stored)} compressed)" if zstd_level is not None
                                                else "")
    rep.say(f"wrote {size} to {base.description}: {len(state.vps)} CPUs, {len(result.layout.segments)} "
            f"PT_LOAD segments" + (", VMCOREINFO from guest memory" if k else ", no VMCOREINFO"))
    if hashing is not None:
        digest = hashing.hexdigest()
        click.echo(f"{digest}  {output if output not in (None, '-') else (ssh_target or '-')}", err=output == "-")
        if output not in (None, "-"):
            _write_digest_file(Path(str(output)), digest)
    for note in getattr(base, "notes", []):
        rep.say(note)
    if ssh_target is not None:
        rep.say(base.remote_hint(compressed=zstd_level is not None))  # type: ignore[attr-defined]


def _convert_kdump(input_path: Path, output: str | None, *, force: bool, quiet: bool, progress: bool | None,
                   compress: str, ssh_target: str | None, ssh_options: tuple[str, ...], accept_new: bool,
                   verify: bool, want_sha256: bool) -> None:
    """--format kdump: the file form on a file or an upload, the flattened form on a pipe."""
    from vm2core.core.kdump import convert_kdump
    from vm2core.sinks.hashing import file_sha256

    rep = _Reporter(quiet, progress)
    with SavedState.open(input_path) as state:
        if state.dirty:
            rep.warn(f"{input_path}: the replay log holds uncommitted changes; memory may be incomplete")
        base = _open_sink(output, force, input_path, ssh_target, ssh_options, accept_new, verify)
        # A local file is hashed by reading it back once complete (its descriptor table is filled in
        # after the pages); on any other output the digest covers the (flattened) bytes streamed.
        temp_path = getattr(base, "temp_path", None) if base.positional else None
        hashing = HashingSink(base) if want_sha256 and temp_path is None else None
        sink: Sink = hashing or base
        digest = None
        try:
            result = convert_kdump(state, sink, compress=compress, progress=rep.progress, warn=rep.warn)
            if want_sha256 and temp_path is not None:
                digest = file_sha256(temp_path)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    if hashing is not None:
        digest = hashing.hexdigest()
    k = result.selection.kernel
    if k is not None:
        pb = "unknown" if k.phys_base is None else f"{k.phys_base:#x}"
        rep.say(f"guest kernel {k.osrelease}, KERNELOFFSET={k.kernel_offset or 0:#x}, phys_base={pb}")
    assert result.kdump is not None
    form = "flattened kdump-compressed" if result.flattened else "kdump-compressed"
    rep.say(f"wrote {human_bytes(base.position)} ({form}, {compress}; {human_bytes(result.kdump.pages * 4096)} of "
            f"RAM, {result.zero_pages} zero pages, {result.shared_pages} shared) to {base.description}: "
            f"{len(state.vps)} CPUs"
            + (", VMCOREINFO from guest memory" if k else ", no VMCOREINFO"))
    if result.flattened:
        rep.say("flattened form (the output cannot seek): crash reads it as is; `makedumpfile -R FILE < IT` "
                "turns it into the file form")
    if digest is not None:
        click.echo(f"{digest}  {output if output not in (None, '-') else (ssh_target or '-')}", err=output == "-")
        if output not in (None, "-"):
            _write_digest_file(Path(str(output)), digest)
    for note in getattr(base, "notes", []):
        rep.say(note)
    if ssh_target is not None:
        rep.say(base.remote_hint(compressed=False))  # type: ignore[attr-defined]


def _write_digest_file(core: Path, digest: str) -> None:
    """``OUTPUT.sha256`` in sha256sum's format, so ``sha256sum -c`` checks the core."""
    target = core.with_name(core.name + ".sha256")
    try:
        target.write_text(f"{digest}  {core.name}\n", encoding="ascii")
    except OSError as e:
        raise OutputError(f"{target}: cannot write the digest: {e.strerror or e}") from None


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--no-scan", is_flag=True, help="Do not search guest memory for the kernel (fast).")
@click.option("--progress/--no-progress", default=None, help="Show progress on stderr.")
def info(input_path: Path, as_json: bool, no_scan: bool, progress: bool | None) -> None:
    """Describe a saved state: VM, CPUs, memory ranges and the guest kernel found in memory."""
    _run(_info, input_path, as_json, not no_scan, progress)


def _info(input_path: Path, as_json: bool, scan: bool, progress: bool | None) -> None:
    from vm2core.info import describe

    rep = _Reporter(False, progress)
    with SavedState.open(input_path) as state:
        report = describe(state, rep.progress, scan=scan)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_info(report))


def render_info(r: dict[str, Any]) -> str:
    c = r["container"]
    lines = [
        f"file:              {r['file']} ({human_bytes(r['file_size'])})",
        f"container:         HyperVStorage {c['format_version']}, header copy {c['header_copy']} "
        f"(sequence {c['sequence']}), {c['keys']} keys in {c['key_tables']} key tables",
        f"VM version:        {r['vm_version']}",
        f"saved-state type:  {r['saved_state_type'] or '(not recorded)'}",
        f"dirty replay log:  {'yes (uncommitted changes!)' if r['dirty_replay_log'] else 'no'}",
        f"processors:        {r['vp_count']} x {r['architecture']} ({r['vendor']}), "
        f"VTLs saved: {', '.join(map(str, r['vtls']))}",
    ]
    for vp in r["vps"]:
        lines.append(f"  VP {vp['index']:<3} RIP {vp['rip']:#018x}  RSP {vp['rsp']:#018x}  "
                     f"CR3 {vp['cr3']:#014x}  IDTR {vp['idtr_base']:#018x}")
    lines.append(f"memory ranges:     {len(r['memory_ranges'])}")
    for m in r["memory_ranges"]:
        lines.append(f"  {m['gpa_start']:#014x}-{m['gpa_end']:#014x}  {m['pages']:>9} pages "
                     f"({human_bytes(m['pages'] * 4096)})  NUMA node {m['numa_node']}")
    b = r["blocks"]
    lines += [
        f"total RAM:         {human_bytes(r['total_ram'])}",
        f"stored RAM data:   {human_bytes(r['stored_bytes'])} in {b['raw']} raw, {b['records']} "
        f"record-encoded and {b['missing']} missing blocks",
        f"zero pages:        {r['zero_pages']} ({100 * r['zero_share']:.1f}% of RAM, from fill records "
        "and missing blocks)",
    ]
    if "guest_kernel" in r:
        k = r["guest_kernel"]
        if k:
            off = "none (no KASLR)" if k["kernel_offset"] is None else f"{k['kernel_offset']:#x}"
            pb = "unknown" if k["phys_base"] is None else f"{k['phys_base']:#x}"
            lines += [
                f"guest kernel:      Linux {k['osrelease']}",
                f"  KERNELOFFSET     {off}",
                f"  phys_base        {pb}",
                f"  VMCOREINFO note  at GPA {k['vmcoreinfo_gpa']:#x}"
                + (f" ({k['copies']} identical copies)" if k["copies"] > 1 else ""),
            ]
            lines += [f"  caveat: {c_}" for c_ in k["caveats"]]
        else:
            lines.append("guest kernel:      not found")
        lines += [f"  {reason}" for reason in r.get("guest_kernel_reasons", []) if not k]
    return "\n".join(lines)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(input_path: Path, as_json: bool) -> None:
    """List every key of a HyperVStorage file (.vmrs, .vsv, .vmcx) with its type and size.

    For files vm2core cannot convert (e.g. the legacy .vsv of Server 2012 R2), this shows what is
    inside without guessing at its meaning.
    """
    _run(_inspect, input_path, as_json)


def _inspect(input_path: Path, as_json: bool) -> None:
    from vm2core.reader.container import HyperVStorage

    with HyperVStorage.open(input_path) as c:
        rows = [{"path": k.path, "type": k.type_name, "size": k.data_size, "file_offset": k.data_offset,
                 "file_object": k.in_file_object} for k in sorted(c.keys.values(), key=lambda k: k.path)]
        if as_json:
            click.echo(json.dumps({"format_version": c.header.format_version,
                                   "dirty_replay_log": bool(c.replay_log and c.replay_log.dirty),
                                   "keys": rows}, indent=2))
            return
        click.echo(f"# HyperVStorage {c.header.format_version >> 8}.{c.header.format_version & 0xff}, "
                   f"{len(rows)} keys")
        for row in rows:
            click.echo(f"{row['type']:<7} {row['size']:>10}  {row['path']}")
