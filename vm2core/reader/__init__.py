"""Reader layer: HyperVStorage container -> saved state -> guest memory and CPU state."""
