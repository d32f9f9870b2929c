"""vm2core: Hyper-V saved state of a Linux guest -> ELF vmcore for crash and drgn."""

__version__ = "0.1.0"
