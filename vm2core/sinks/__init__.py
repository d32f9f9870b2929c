"""Sinks: where the core's bytes go (file, stdout, zstd stream, SFTP upload)."""
