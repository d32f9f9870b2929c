"""Command line: maps arguments to a saved-state reader and a sink; owns messages and exit codes.

Exit codes (also in README and ``--help``):
  0  success
  1  the core could not be written (output exists, terminal, disk full, broken pipe, network)
  2  bad or unsupported input, or bad usage
  3  internal error (a bug: please report it; VM2CORE_DEBUG=1 shows the traceback)
  4  with --salvage: the core (or info) was written, but parts of the input could not be read
  130 interrupted (Ctrl-C); 128+N ended by SIGTERM/SIGHUP (143/129)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vm2core import __version__
from vm2core.core.convert import Progress, convert
from vm2core.core.sizing import parse_size, planned_core_size
from vm2core.errors import OutputError, SizeLimitError, UsageError, Vm2coreError
from vm2core.guest.vmcoreinfo import GuestKernel
from vm2core.progress import LogProgress, TerminalProgress, human_bytes
from vm2core.reader.backend import BACKENDS, SavedStateFace, open_saved_state
from vm2core.reader.salvage import EXIT_WITH_LOSSES, SalvageReport
from vm2core.reader.xpress import check_backend
from vm2core.signals import Interrupted, cleanup_on_termination
from vm2core.sinks.base import Sink
from vm2core.sinks.file import FileSink, StdoutSink, open_output, remove_pending_outputs, write_beside
from vm2core.sinks.hashing import HashingSink
from vm2core.sinks.zstd import DEFAULT_LEVEL, ZSTD_SUFFIXES, ZstdSink, parse_level

KDUMP_CODECS = ["zlib", "zstd", "snappy", "none"]     # vm2core.core.kdump.CODECS (imported lazily)

EXIT_OK, EXIT_OUTPUT, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
PLANNED_SIZE_PREFIX = "planned core size: "     # printed before streaming, with the progress


class LossesError(Vm2coreError):
    """--salvage wrote its result, but parts of the input were unreadable (listed above it)."""

    exit_code = EXIT_WITH_LOSSES


EPILOG = """\b
Exit codes: 0 success; 1 the core could not be written; 2 bad or unsupported input or usage;
3 internal error (VM2CORE_DEBUG=1 shows a traceback); 4 core written with losses (--salvage);
130 interrupted (Ctrl-C); 128+N ended by signal N (143 SIGTERM, 129 SIGHUP): the partial output is removed.
\b
Examples:
  vm2core GUEST.vmrs GUEST.core
  vm2core GUEST.vmrs - | zstd > GUEST.core.zst
  vm2core info GUEST.vmrs
  vm2core list DIR                      (on Windows: vm2core list)
  vm2core --vm "web 01" --checkpoint before-upgrade web01.core
  vm2core dmesg GUEST.vmrs              (or GUEST.core)
\b
Windows PowerShell 5.1 corrupts binary data in pipes and > redirections: write to an OUTPUT file,
use --ssh, or run the pipe in cmd: cmd /c "vm2core x.vmrs - | zstd > x.zst" (PowerShell >= 7.4 is
byte-safe, but never with 2>&1).
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
        self.shows_progress = show

    def say_with_progress(self, message: str) -> None:
        """Part of the progress display (a terminal, or --progress): a script that reads stderr
        keeps its one-line error contract and uses --max-size instead."""
        if self.shows_progress:
            click.echo(message, err=True)

    def say(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        if not self.quiet:
            _err(f"warning: {message}")


def _run(func: Any, *args: Any, **kwargs: Any) -> None:
    """Turn every failure into one line and an exit code."""
    try:
        with cleanup_on_termination():      # SIGTERM, SIGHUP (Ctrl-Break) clean up like Ctrl-C
            check_backend()
            func(*args, **kwargs)
    except Vm2coreError as e:
        _err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        remove_pending_outputs()
        if isinstance(e, Interrupted):
            _err(f"terminated ({e.signal_name})")
            sys.exit(128 + e.signum)
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
    vm2core INPUT OUTPUT        convert (OUTPUT "-" = standard output, /dev/null = dry run)
    vm2core X.vsv X.bin OUTPUT  convert a legacy pair (through Microsoft's DLL)
    vm2core info INPUT          describe the saved state and the guest kernel in it
    vm2core dmesg INPUT         print the guest kernel log (INPUT: saved state or ELF core)
    vm2core inspect INPUT       list the raw keys of any HyperVStorage file (a page census of others)
    vm2core list [DIR]          list the VMs and checkpoints of a Hyper-V host (or a copied folder)
    vm2core --vm NAME OUTPUT    convert a VM's saved state found by name (--checkpoint NAME too)
    """
    # VM names may hold any character; a Windows pipe's code page must not turn one into a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


_VM_OPTIONS = [
    click.option("--vm", "vm", metavar="NAME|GUID|PATH",
                 help="Take the saved state of this VM (name, unique name prefix, GUID, or its .vmcx/folder) "
                      "instead of INPUT; `vm2core list` shows the VMs."),
    click.option("--checkpoint", "checkpoint", metavar="NAME|GUID",
                 help="With --vm: take this checkpoint's saved state instead of the VM's."),
    click.option("--dir", "dirs", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
                 help="Where --vm looks (repeatable): a Hyper-V folder or a copy of one. "
                      "Default on Windows: the host's Hyper-V data root."),
]


def _vm_options(func: Any) -> Any:
    for option in reversed(_VM_OPTIONS):
        func = option(func)
    return func


def _pick_input(input_path: Path | None, vm: str | None, checkpoint: str | None, dirs: tuple[Path, ...],
                rep: _Reporter | None = None) -> Path:
    """INPUT as given, or the saved state --vm/--checkpoint names (the plain answer if it holds no memory)."""
    if vm is None:
        assert input_path is not None
        return input_path
    from vm2core.hostcli import choose_roots
    from vm2core.reader.host import resolve_saved_state

    path = resolve_saved_state(vm, checkpoint, choose_roots(dirs))
    if rep is not None:
        rep.say(f"using {path}")
    return path


def _vm_arguments(input_path: Path | None, output: str | None, vm: str | None,
                  checkpoint: str | None) -> tuple[Path | None, str | None]:
    """With --vm the only positional argument is OUTPUT."""
    if checkpoint is not None and vm is None:
        raise click.UsageError("--checkpoint needs --vm")
    if vm is None:
        if input_path is None:
            raise click.UsageError("give INPUT (a .vmrs file) or --vm NAME")
        return input_path, output
    if output is not None:
        raise click.UsageError("with --vm give only OUTPUT, not INPUT")
    return None, None if input_path is None else str(input_path)


def _input_chooser(input_paths: tuple[Path, ...], vm: str | None, checkpoint: str | None,
                   dirs: tuple[Path, ...], too_many: str) -> Callable[[], list[Path]]:
    """INPUT [INPUT2] or --vm for info and dmesg: usage checked now, the VM looked up later (inside
    ``_run``, since the lookup reads host files and its errors are one line)."""
    if len(input_paths) > 2:
        raise click.UsageError(too_many)
    if input_paths and vm is not None:
        raise click.UsageError("give INPUT or --vm, not both")
    _vm_arguments(input_paths[0] if input_paths else None, None, vm, checkpoint)
    return lambda: list(input_paths) or [_pick_input(None, vm, checkpoint, dirs)]


def _backend_options(func: Any) -> Any:
    """--backend and --dll, shared by convert and info."""
    func = click.option("--dll", "dll", type=click.Path(path_type=Path), default=None, metavar="PATH",
                        help="Microsoft's vmsavedstatedumpprovider.dll (default: next to vm2core, on PATH, or in "
                             "the Windows SDK's bin\\<version>\\x64).")(func)
    return click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                        help="Reader: native, Microsoft's DLL, or auto (native for .vmrs, the DLL for a .vsv+.bin "
                             "pair and for .vmrs variants the native reader refuses).")(func)


def _split_inputs(args: tuple[str, ...], ssh_target: str | None, vm: str | None,
                  checkpoint: str | None) -> tuple[list[Path], str | None]:
    """INPUT [INPUT2] OUTPUT (or INPUT [INPUT2] with --ssh): a .vmrs, or a .vsv and .bin in any order.

    With --vm the only positional is OUTPUT (none with --ssh); the inputs come back empty."""
    if vm is not None:
        if len(args) > 1:
            raise UsageError("with --vm give only OUTPUT (or --ssh), not INPUT")
        return [], (args[0] if args else None)
    if checkpoint is not None:
        raise UsageError("--checkpoint needs --vm")
    if ssh_target is not None:
        if len(args) == 2 and not Path(args[1]).exists():
            raise UsageError(f"give either OUTPUT ({args[1]}) or --ssh, not both")
        inputs, output = list(args), None
    elif not args:
        raise UsageError("missing INPUT: give a .vmrs (or a .vsv and its .bin), or --vm NAME")
    elif len(args) == 1:               # no OUTPUT: the usage check says so in its own words
        inputs, output = list(args), None
    else:
        inputs, output = list(args[:-1]), args[-1]
    if not 1 <= len(inputs) <= 2:
        raise UsageError("give one .vmrs, or a .vsv and its .bin (in either order), then OUTPUT")
    return [Path(p) for p in inputs], output


class _ConvertCommand(click.Command):
    """``--zstd`` is a flag, so ``vm2core --zstd IN OUT`` keeps its positionals; the README's
    ``--zstd=LEVEL`` (one word) is read as ``--zstd-level=LEVEL``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        args = [f"--zstd-level={a[len('--zstd='):]}" if i < end and a.startswith("--zstd=") else a
                for i, a in enumerate(args)]
        return super().parse_args(ctx, args)


@main.command("convert", cls=_ConvertCommand, epilog=EPILOG)
@click.argument("paths", metavar="INPUT [INPUT2] [OUTPUT]", nargs=-1)
@click.option("-f", "--force", is_flag=True,
              help="Overwrite OUTPUT (or the remote file) if it exists; allow a terminal as stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress on stderr (default: only when stderr is a terminal).")
@click.option("--exclude-zero", is_flag=True,
              help="Leave runs of >= 256 zero pages out of the core (split PT_LOADs, like makedumpfile -E).")
@click.option("--zstd", "zstd", is_flag=True,
              help="Compress with zstd (all cores, level 3; --zstd=LEVEL or --zstd-level LEVEL for another). "
                   "Implied by an OUTPUT ending in .zst.")
@click.option("--zstd-level", "zstd_level_text", metavar="LEVEL", default=None,
              help="zstd level (-131072..22, negative = faster); implies --zstd.")
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
              help="Print the SHA-256 of the bytes written (and write OUTPUT.sha256 for a file; "
                   "an existing one is replaced only with -f).")
@click.option("--salvage", is_flag=True,
              help="Read whatever can be read: unreadable RAM blocks become zeros, vCPUs with unreadable "
                   "registers are left out; each loss is listed on stderr and the exit code is 4.")
@click.option("--salvage-report", "salvage_report", type=click.Path(path_type=Path), metavar="FILE",
              help="With --salvage: also write the list of losses as JSON to FILE.")
@click.option("--max-size", "max_size", metavar="SIZE",
              help="Refuse (exit 2, nothing written) a core larger than SIZE, e.g. 64G or 512M. "
                   "The planned size is shown with the progress.")
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
@_backend_options
@_vm_options
def convert_cmd(paths: tuple[str, ...], force: bool, quiet: bool, progress: bool | None,
                exclude_zero: bool, zstd: bool, zstd_level_text: str | None, ssh_target: str | None,
                ssh_options: tuple[str, ...], ssh_accept_new: bool, verify: bool, want_sha256: bool, backend: str,
                dll: Path | None, vm: str | None, checkpoint: str | None, dirs: tuple[Path, ...], salvage: bool,
                salvage_report: Path | None, max_size: str | None, out_format: str | None,
                compress: str | None) -> None:
    """Convert INPUT (.vmrs, or a legacy .vsv and .bin in either order) into an ELF core at OUTPUT
    ("-" for standard output) or on a remote host.

    With --vm NAME [--checkpoint NAME] the saved state is found by name, GUID or path instead of INPUT
    (`vm2core --vm web01 web01.core`).

    A local core is written to a temporary file beside OUTPUT and renamed when complete; an
    upload goes to PATH.<hex>.partial and is renamed when complete. The core carries one PT_LOAD per
    guest RAM range, NT_PRSTATUS and QEMU-style CPU notes for every virtual processor, and the
    guest kernel's own VMCOREINFO note, so `crash vmlinux OUTPUT` and `drgn -c OUTPUT` need no
    extra options. With --format kdump (or OUTPUT ending in .kdump) the same contents are written
    in makedumpfile's kdump-compressed format, which crash and drgn open without decompressing.
    """

    def run(**kwargs: Any) -> None:
        inputs, output = _split_inputs(paths, ssh_target, vm, checkpoint)
        _convert(inputs, output, **kwargs)

    _run(run, force=force, quiet=quiet, progress=progress, exclude_zero=exclude_zero,
         zstd=zstd, zstd_level_text=zstd_level_text, ssh_target=ssh_target, ssh_options=ssh_options,
         accept_new=ssh_accept_new, verify=verify, want_sha256=want_sha256, backend=backend, dll=dll,
         vm=vm, checkpoint=checkpoint, dirs=dirs, salvage=salvage, salvage_report=salvage_report, max_size=max_size,
         out_format=out_format, compress=compress)


def _check_usage(output: str | None, *, force: bool, zstd: bool, zstd_level_text: str | None,
                 ssh_target: str | None, ssh_options: tuple[str, ...], accept_new: bool, verify: bool,
                 want_sha256: bool) -> tuple[int | None, Path | None]:
    """Every check of the arguments, before the input is read or any output exists.

    Returns the zstd level (None: no compression) and the ``OUTPUT.sha256`` to write (None: none)."""
    if output is None and ssh_target is None:
        raise UsageError("no OUTPUT given: name a core file, - for standard output, or --ssh [USER@]HOST:PATH")
    if output is not None and ssh_target is not None:
        raise UsageError(f"give either OUTPUT ({output}) or --ssh, not both")
    if verify and ssh_target is None:
        raise UsageError("--verify checks an upload: use it with --ssh (for a local file use --sha256)")
    level = parse_level(zstd_level_text) if zstd_level_text is not None else None
    if level is None and (zstd or (output not in (None, "-") and str(output).lower().endswith(ZSTD_SUFFIXES))):
        level = DEFAULT_LEVEL
    if ssh_target is not None:
        from vm2core.sinks.sshtarget import parse_ssh_options, parse_target, resolve

        # Target, options and ssh_config values, resolved as the upload will resolve them.
        resolve(parse_target(ssh_target), parse_ssh_options(ssh_options), accept_new=accept_new)
    digest_file = None
    if want_sha256 and output not in (None, "-"):
        target = Path(str(output))
        regular = not target.exists() or target.is_file()     # no OUTPUT.sha256 beside a device or FIFO
        digest_file = target.with_name(target.name + ".sha256") if regular else None
        if digest_file is not None and digest_file.exists() and not force:
            raise OutputError(f"{digest_file}: already exists (use -f to overwrite)")
    return level, digest_file


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


def _open_sink_guard(output: str | None, input_path: Path) -> None:
    if output in (None, "-"):
        return
    target = Path(str(output))
    try:
        if target.exists() and target.resolve() == input_path.resolve():
            raise OutputError(f"{target}: output is the input file")
    except OSError:
        pass


def _convert(inputs: list[Path], output: str | None, *, force: bool, quiet: bool, progress: bool | None,
             exclude_zero: bool, zstd: bool, zstd_level_text: str | None, ssh_target: str | None,
             ssh_options: tuple[str, ...], accept_new: bool, verify: bool, want_sha256: bool,
             backend: Any = "auto", dll: Path | None = None, vm: str | None = None, checkpoint: str | None = None,
             dirs: tuple[Path, ...] = (), salvage: bool = False, salvage_report: Path | None = None,
             max_size: str | None = None, out_format: str | None = None, compress: str | None = None) -> None:
    _check_salvage_options(salvage, salvage_report)
    zstd_level, digest_file = _check_usage(output, force=force, zstd=zstd, zstd_level_text=zstd_level_text,
                                           ssh_target=ssh_target, ssh_options=ssh_options, accept_new=accept_new,
                                           verify=verify, want_sha256=want_sha256)
    kdump = _kdump_format(out_format, compress, output, ssh_target, zstd_level, exclude_zero, max_size)
    try:
        size_limit = None if max_size is None else parse_size(max_size)
    except ValueError as e:
        raise UsageError(f"--max-size: {e}") from None
    rep = _Reporter(quiet, progress)
    _refuse_existing_report(salvage_report, force)
    if not inputs:
        inputs = [_pick_input(None, vm, checkpoint, dirs, rep)]
    with open_saved_state(inputs, backend=backend, dll=dll, warn=rep.warn, salvage=salvage) as state:
        input_path = state.path
        if exclude_zero and state.backend == "dll":
            rep.warn("--exclude-zero: the DLL reports no zero-page metadata, so nothing is left out")
        if state.dirty:
            rep.warn(f"{input_path}: the replay log holds uncommitted changes; memory may be incomplete")
        for other in inputs:           # the .vsv of a pair is an input too
            _open_sink_guard(output, other)
        if kdump:
            _convert_kdump(state, output, rep, force=force, compress=compress or "zlib",
                           ssh_target=ssh_target, ssh_options=ssh_options, accept_new=accept_new, verify=verify,
                           want_sha256=want_sha256, digest_file=digest_file)
            if salvage:
                _finish_salvage(state.salvage_report(), salvage_report, "core written")
            return
        zeros = None
        if state.architecture == "x86_64":          # (other guests: convert() explains the refusal)
            planned, zeros = planned_core_size(state, exclude_zero=exclude_zero)
            if size_limit is not None and planned > size_limit:
                raise SizeLimitError(f"{input_path}: the core would be {human_bytes(planned)} ({planned} bytes), "
                                     f"more than --max-size {human_bytes(size_limit)}; nothing was written")
            rep.say_with_progress(f"{PLANNED_SIZE_PREFIX}{human_bytes(planned)} ({planned} bytes)")
        # The output is created here, inside the guarded region: whatever fails from now on (a
        # wrapper, the conversion, a signal) removes it.
        sink: Sink | None = None
        try:
            base = _open_sink(output, force, input_path, ssh_target, ssh_options, accept_new, verify)
            sink = base
            # The digest covers the bytes that reach the output (compressed ones with --zstd).
            hashing = HashingSink(base) if want_sha256 else None
            sink = hashing or base
            if zstd_level is not None:
                sink = ZstdSink(sink, level=zstd_level)
            result = convert(state, sink, progress=rep.progress, warn=rep.warn, exclude_zero=exclude_zero,
                             zeros=zeros)
            sink.commit()
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
    k = result.selection.kernel
    _say_kernel(rep, k)
    stored = base.position
    size = human_bytes(result.bytes_written) + (f" ({human_bytes(stored)} compressed)" if zstd_level is not None
                                                else "")
    rep.say(f"wrote {size} to {base.description}: {len(state.vps)} CPUs, {len(result.layout.segments)} "
            f"PT_LOAD segments" + (", VMCOREINFO from guest memory" if k else ", no VMCOREINFO"))
    _after_commit(rep, base, hashing.hexdigest() if hashing is not None else None, output=output,
                  ssh_target=ssh_target, digest_file=digest_file, force=force, compressed=zstd_level is not None)
    if salvage:
        _finish_salvage(state.salvage_report(), salvage_report, "core written")


def _write_digest_file(target: Path, core: Path, digest: str, *, force: bool) -> None:
    """``OUTPUT.sha256`` in sha256sum's format, so ``sha256sum -c`` checks the core (never
    replacing an existing file without -f, never half-written)."""
    write_beside(target, f"{digest}  {core.name}\n".encode("ascii"), force=force, what="the digest")


def _say_kernel(rep: _Reporter, k: GuestKernel | None) -> None:
    if k is not None:
        pb = "unknown" if k.phys_base is None else f"{k.phys_base:#x}"
        rep.say(f"guest kernel {k.osrelease}, KERNELOFFSET={k.kernel_offset or 0:#x}, phys_base={pb}")


def _after_commit(rep: _Reporter, base: Sink, digest: str | None, *, output: str | None, ssh_target: str | None,
                  digest_file: Path | None, force: bool, compressed: bool) -> None:
    """What every output form says once the core is in place: digest (and OUTPUT.sha256), sink notes,
    and for an upload the command to run on the remote side."""
    if digest is not None:
        click.echo(f"{digest}  {output if output not in (None, '-') else (ssh_target or '-')}", err=output == "-")
        if digest_file is not None and isinstance(base, FileSink):
            _write_digest_file(digest_file, base.target, digest, force=force)
    for note in getattr(base, "notes", []):
        rep.say(note)
    if ssh_target is not None:
        rep.say(base.remote_hint(compressed=compressed))  # type: ignore[attr-defined]


def _kdump_format(out_format: str | None, compress: str | None, output: str | None, ssh_target: str | None,
                  zstd_level: int | None, exclude_zero: bool, max_size: str | None) -> bool:
    """True for --format kdump (or an OUTPUT ending in .kdump); refuses the options that cannot go with it."""
    name = (output if output not in (None, "-") else ssh_target) or ""
    bare = name.lower()
    for suffix in ZSTD_SUFFIXES:
        bare = bare[:-len(suffix)] if bare.endswith(suffix) else bare
    if (out_format or ("kdump" if bare.endswith(".kdump") else "elf")) == "elf":
        if compress is not None:
            raise UsageError("--compress chooses the page compression of --format kdump (for an ELF core use --zstd)")
        return False
    if zstd_level is not None:
        raise UsageError("--format kdump compresses every page itself: a --zstd (.zst) stream around it gains "
                         "nothing and crash could not open it; use --compress zstd")
    if exclude_zero:
        raise UsageError("--exclude-zero is for ELF cores: a kdump core always stores zero pages as one shared page")
    if max_size is not None:
        raise UsageError("--max-size bounds an ELF core (its size is known before writing); a kdump core's size "
                         "depends on how well its pages compress")
    return True


def _convert_kdump(state: SavedStateFace, output: str | None, rep: _Reporter, *, force: bool,
                   compress: str, ssh_target: str | None, ssh_options: tuple[str, ...], accept_new: bool,
                   verify: bool, want_sha256: bool, digest_file: Path | None) -> None:
    """--format kdump: the file form on a file or an upload, the flattened form on a pipe."""
    from vm2core.core.kdump import convert_kdump
    from vm2core.sinks.hashing import file_sha256

    input_path = state.path
    # The output is created inside the guarded region: whatever fails from now on removes it.
    sink: Sink | None = None
    digest = None
    try:
        base = _open_sink(output, force, input_path, ssh_target, ssh_options, accept_new, verify)
        sink = base
        # A local file is hashed by reading it back once complete (its descriptor table is filled in
        # after the pages); on any other output the digest covers the (flattened) bytes streamed.
        temp_path = getattr(base, "temp_path", None) if base.positional else None
        hashing = HashingSink(base) if want_sha256 and temp_path is None else None
        sink = hashing or base
        result = convert_kdump(state, sink, compress=compress, progress=rep.progress, warn=rep.warn)
        if want_sha256 and temp_path is not None:
            digest = file_sha256(temp_path)
        sink.commit()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if hashing is not None:
        digest = hashing.hexdigest()
    k = result.selection.kernel
    _say_kernel(rep, k)
    assert result.kdump is not None
    form = "flattened kdump-compressed" if result.flattened else "kdump-compressed"
    rep.say(f"wrote {human_bytes(base.position)} ({form}, {compress}; {human_bytes(result.kdump.pages * 4096)} of "
            f"RAM, {result.zero_pages} zero pages, {result.shared_pages} shared) to {base.description}: "
            f"{len(state.vps)} CPUs"
            + (", VMCOREINFO from guest memory" if k else ", no VMCOREINFO"))
    if result.flattened:
        rep.say("flattened form (the output cannot seek): crash reads it as is; `makedumpfile -R FILE < IT` "
                "turns it into the file form")
    _after_commit(rep, base, digest, output=output, ssh_target=ssh_target, digest_file=digest_file, force=force,
                  compressed=False)


@main.command()
@click.argument("input_paths", metavar="INPUT [INPUT2]", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--no-scan", is_flag=True,
              help="Read no guest memory: skip the kernel search and the zero-page count (fast: metadata only).")
@click.option("--progress/--no-progress", default=None, help="Show progress on stderr.")
@click.option("--salvage", is_flag=True,
              help="Describe what can be read; list what cannot (stderr, exit code 4).")
@click.option("--salvage-report", "salvage_report", type=click.Path(path_type=Path), metavar="FILE",
              help="With --salvage: also write the list of losses as JSON to FILE.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing --salvage-report FILE.")
@click.option("--log-lines", type=click.IntRange(min=0), default=10, show_default=True, metavar="N",
              help="Show the last N lines of the guest kernel log (0: none).")
@_backend_options
@_vm_options
def info(input_paths: tuple[Path, ...], as_json: bool, no_scan: bool, progress: bool | None, salvage: bool,
         salvage_report: Path | None, force: bool, log_lines: int, backend: str, dll: Path | None,
         vm: str | None, checkpoint: str | None, dirs: tuple[Path, ...]) -> None:
    """Describe a saved state (a .vmrs, or a .vsv and its .bin): VM, CPUs, memory ranges and the guest
    kernel found in memory.

    With the kernel found, also the last lines of its log, and a one-line summary at the top when
    the log holds an oops, panic, BUG, soft/hard lockup or hung-task report.
    """
    inputs = _input_chooser(input_paths, vm, checkpoint, dirs, "give one .vmrs, or a .vsv and its .bin")
    _run(lambda: _info(inputs(), as_json, not no_scan, progress, backend, dll, salvage=salvage,
                       salvage_report=salvage_report, force=force, log_lines=log_lines))


@main.command("list")
@click.argument("dirs", metavar="[DIR]...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def list_cmd(dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the VMs and checkpoints under DIR and whether each has a saved state with memory.

    DIR is a Hyper-V folder or a copy of one (the host's data root, or a VM's own folder); default on
    Windows: the host's Hyper-V data root. Reads the host registry data.vmcx when there is one, and
    scans Virtual Machines/ and Snapshots/ folders. Never reads guest memory.
    """
    _run(_list, dirs, as_json)


def _list(dirs: tuple[Path, ...], as_json: bool) -> None:
    from vm2core.hostcli import UsageError, choose_roots, render_list
    from vm2core.reader.host import discover

    roots = choose_roots(dirs)
    if not roots:
        raise UsageError("list: give DIR, a Hyper-V folder or a copy of one (only Windows has a default)")
    inventory = discover(roots)
    click.echo(json.dumps(inventory.to_json(), indent=2, ensure_ascii=False) if as_json else render_list(inventory))


def _info(inputs: list[Path], as_json: bool, scan: bool, progress: bool | None, backend: Any = "auto",
          dll: Path | None = None, *, salvage: bool = False, salvage_report: Path | None = None,
          force: bool = False, log_lines: int = 10) -> None:
    from vm2core.info import describe

    _check_salvage_options(salvage, salvage_report)
    rep = _Reporter(False, progress)
    _refuse_existing_report(salvage_report, force)
    with open_saved_state(inputs, backend=backend, dll=dll, warn=rep.warn, salvage=salvage) as state:
        report = describe(state, rep.progress, scan=scan, log_lines=log_lines)
        losses = state.salvage_report() if salvage else None
    if losses is not None:
        report["salvage"] = losses.as_json()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_info(report))
    if losses is not None:
        _finish_salvage(losses, salvage_report, "description printed")


def render_info(r: dict[str, Any]) -> str:
    klog = r.get("kernel_log") or {}
    lines = [f"PROBLEM in kernel log: {klog['summary']}"] if klog.get("summary") else []
    if "dll" in r:       # read through Microsoft's DLL: no container details, no encodings
        lines += [f"file:              {f['path']} ({human_bytes(f['size'])})" for f in r["files"]]
        lines += [f"backend:           {r['dll']} (Microsoft's DLL)",
                  f"processors:        {r['vp_count']} x {r['architecture']}"]
    else:
        c = r["container"]
        lines += [
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
    lines.append(f"total RAM:         {human_bytes(r['total_ram'])}")
    if "blocks" in r:
        b = r["blocks"]
        lines += [
            f"stored RAM data:   {human_bytes(r['stored_bytes'])} in {b['raw']} raw, {b['records']} "
            f"record-encoded and {b['missing']} missing blocks",
            f"zero pages:        {r['zero_pages']} ({100 * r['zero_share']:.1f}% of RAM, from fill records "
            "and missing blocks)" if r["zero_pages"] is not None else
            "zero pages:        not counted (--no-scan reads no RAM data)",
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
            if r.get("candidates_dropped"):
                lines.append(f"  caveat: {r['candidates_dropped']} further VMCOREINFO-like notes were not examined")
        else:
            lines.append("guest kernel:      not found")
        lines += [f"  {reason}" for reason in r.get("guest_kernel_reasons", []) if not k]
    if klog:
        lines.append(_render_log(klog))
    return "\n".join(lines)


def _check_salvage_options(salvage: bool, report: Path | None) -> None:
    if report is not None and not salvage:
        raise UsageError("--salvage-report lists what --salvage could not read: use it with --salvage")


def _refuse_existing_report(report: Path | None, force: bool) -> None:
    """Checked before any work, so a long conversion does not end on an existing report file."""
    if report is not None and not force and report.exists():
        raise OutputError(f"{report}: already exists (use -f to replace it)")


MAX_LOSS_LINES_WITH_REPORT = 20


def _finish_salvage(report: SalvageReport, report_file: Path | None, what: str) -> None:
    """Print every loss on stderr (even with -q: losses are never only in a log), write the JSON,
    and end with exit code 4 when anything is missing."""
    lines = report.lines()
    if report_file is not None and len(lines) > MAX_LOSS_LINES_WITH_REPORT:
        more = len(lines) - MAX_LOSS_LINES_WITH_REPORT
        lines = lines[:MAX_LOSS_LINES_WITH_REPORT] + [f"... and {more} more, all listed in {report_file}"]
    for line in lines:
        _err(line)
    if report_file is not None:
        try:
            report_file.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"{report_file}: cannot write the salvage report: {e.strerror or e}") from None
    if not report.complete:
        raise LossesError(f"{what} with losses: {human_bytes(report.lost_bytes)} of guest RAM in "
                          f"{len(report.ranges)} range(s) unreadable (zeros in the core), "
                          f"{len(report.vps)} vCPU(s) without registers"
                          + (f"; report in {report_file}" if report_file is not None else ""))


def _render_log(klog: dict[str, Any]) -> str:
    if klog.get("error"):
        return f"kernel log:        not readable: {klog['error']}"
    head = (f"kernel log:        {klog['records']} records ({klog['format']})"
            + (f", last {len(klog['last_lines'])} lines:" if klog["last_lines"] else ""))
    return "\n".join([head, *(f"  {line}" for line in klog["last_lines"])])


@main.command()
@click.argument("input_paths", metavar="INPUT [INPUT2]", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per record and line: seq, ts_nsec, level, caller, text, dictionary.")
@click.option("--tail", type=click.IntRange(min=0), default=None, metavar="N", help="Only the last N records.")
@click.option("--since-clear", is_flag=True, help="Only records after the last `dmesg -c` (clear_seq).")
@click.option("--progress/--no-progress", default=None, help="Show progress of the VMCOREINFO search on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Also say on stderr how much guest memory was read.")
@_backend_options
@_vm_options
def dmesg(input_paths: tuple[Path, ...], as_json: bool, tail: int | None, since_clear: bool, progress: bool | None,
          verbose: bool, backend: str, dll: Path | None, vm: str | None, checkpoint: str | None,
          dirs: tuple[Path, ...]) -> None:
    """Print the guest kernel log of INPUT (a saved state, or an ELF core such as one vm2core wrote).

    Lines as vmcore-dmesg prints them ("[%5lu.%06lu] text"; bytes that are neither printable
    nor white space as \\xNN). No vmlinux is needed: the log is found from the guest's VMCOREINFO
    note alone (lockless ring of 5.10+, structured log of 3.5-5.9, or the older character buffer).
    Exit code 2 when there is no VMCOREINFO, the kernel has no printk buffer (CONFIG_PRINTK=n),
    or a key the log needs is missing.
    """
    inputs = _input_chooser(input_paths, vm, checkpoint, dirs, "give one saved state or core, or a .vsv and its .bin")
    _run(lambda: _dmesg(inputs(), as_json, tail, since_clear, progress, verbose, backend, dll))


def _dmesg(inputs: list[Path], as_json: bool, tail: int | None, since_clear: bool, progress: bool | None,
           verbose: bool, backend: Any = "auto", dll: Path | None = None) -> None:
    from vm2core.dmesg import read_kernel_log
    from vm2core.guest.printk import format_log, record_json

    rep = _Reporter(False, progress)
    input_path = inputs[0]
    source = read_kernel_log(inputs, rep.progress, backend=backend, dll=dll, warn=rep.warn)
    log = source.log
    for warning in log.warnings:
        rep.warn(f"{input_path}: kernel log: {warning}")
    records = log.since_clear() if since_clear else log.records
    if tail is not None:
        records = records[max(0, len(records) - tail):] if tail else []
    out = sys.stdout.buffer
    if as_json:
        out.write(b"".join(json.dumps(record_json(r)).encode() + b"\n" for r in records))
    elif log.raw is not None:                  # legacy buffer: its characters as they are (no clear point)
        lines = log.raw.splitlines(keepends=True)
        out.write(b"".join(lines if tail is None else lines[max(0, len(lines) - tail):] if tail else []))
    else:
        out.write(format_log(log, records))
    out.flush()
    if verbose:
        rep.say(f"{log.kind} log of Linux {source.osrelease}: {len(log.records)} records; read "
                f"{human_bytes(source.search_bytes + source.log_bytes)} of guest memory "
                f"({human_bytes(source.search_bytes)} searching for VMCOREINFO, "
                f"{human_bytes(source.log_bytes)} for page tables and the log)")


@main.command()
@click.argument("input_paths", metavar="INPUT [INPUT2]", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(input_paths: tuple[Path, ...], as_json: bool) -> None:
    """List every key of a HyperVStorage file (.vmrs, .vsv, .vmcx) with its type and size; for any
    other file (e.g. the .bin of a legacy pair) print its size and a page census.

    For files vm2core cannot convert (e.g. the legacy .vsv of Server 2012 R2), this shows what is
    inside without guessing at its meaning, and without revealing memory contents.
    """
    if len(input_paths) > 2:
        raise click.UsageError("give one file, or a .vsv and its .bin")
    for i, path in enumerate(input_paths):
        if i:
            click.echo("")
        _run(_inspect, path, as_json)


def _inspect(input_path: Path, as_json: bool) -> None:
    from vm2core.reader.backend import is_hyperv_storage
    from vm2core.reader.container import HyperVStorage

    if not is_hyperv_storage(input_path):
        from vm2core.reader.census import page_census, render_census

        census = page_census(input_path)
        click.echo(json.dumps({"kind": "page census", **census.as_dict()}, indent=2) if as_json
                   else render_census(census))
        return
    # One row at a time: a file may hold millions of keys (memory must not follow their count).
    with HyperVStorage.open(input_path) as c:
        def rows() -> Any:
            for path in c.keys.sorted_paths():
                k = c.keys[path]
                yield {"path": k.path, "type": k.type_name, "size": k.data_size, "file_offset": k.data_offset,
                       "file_object": k.in_file_object}

        if as_json:
            head = json.dumps({"format_version": c.header.format_version,
                               "dirty_replay_log": bool(c.replay_log and c.replay_log.dirty),
                               "replay_log": c.replay_log.describe() if c.replay_log else None}, indent=2)
            click.echo(head[:-2] + ',\n  "keys": [', nl=False)
            for n, row in enumerate(rows()):
                click.echo(("," if n else "") + "\n    " + json.dumps(row), nl=False)
            click.echo("\n  ]\n}")
            return
        click.echo(f"# HyperVStorage {c.header.format_version >> 8}.{c.header.format_version & 0xff}, "
                   f"{len(c.keys)} keys")
        if c.replay_log is not None:
            click.echo(f"# replay log: {c.replay_log.describe()['state']}")
        for row in rows():
            click.echo(f"{row['type']:<7} {row['size']:>10}  {row['path']}")
