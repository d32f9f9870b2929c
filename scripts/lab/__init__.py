"""Real-kernel test lab: boot a Debian kernel in QEMU, capture it, check cores with crash and drgn.

Linux-only test tooling; see scripts/lab/README.md. Prepare the machine once with scripts/lab/setup.sh.
"""
