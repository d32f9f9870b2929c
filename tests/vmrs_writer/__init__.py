"""Test-only .vmrs writer, written from docs/vmrs-format.md independently of the vm2core reader.

See WRITER_API.md for the agreed interface; the on-disk choices the format leaves open are
documented in the module docstrings (keystore: entry CRCs; writer: layout; partition_state:
chunk layouts; ramblock: record policies).
"""

from tests.vmrs_writer.options import BlockEncoder, PagePolicy, RangeSpec, WriterOptions
from tests.vmrs_writer.sources import ram_from_bytes, ram_from_file
from tests.vmrs_writer.writer import write_hvs, write_vmrs

__all__ = ["BlockEncoder", "PagePolicy", "RangeSpec", "WriterOptions", "ram_from_bytes", "ram_from_file",
           "write_hvs", "write_vmrs"]
