"""One conversion through the library with bench-only knobs (the CLI has no --no-scan on purpose).

  python -m scripts.bench_lib.convert_once [--no-scan] [--exclude-zero] [--workers N] INPUT OUTPUT|-
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vm2core.core.convert import convert
from vm2core.reader.savedstate import SavedState
from vm2core.sinks.base import Sink
from vm2core.sinks.file import FileSink, StdoutSink


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input", type=Path)
    ap.add_argument("output")
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--exclude-zero", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    with SavedState.open(args.input) as state:
        sink: Sink = StdoutSink() if args.output == "-" else FileSink(Path(args.output), force=True)
        try:
            convert(state, sink, exclude_zero=args.exclude_zero, workers=args.workers,
                    find_vmcoreinfo=not args.no_scan)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
