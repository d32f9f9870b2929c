"""Developer and test tooling (not part of the vm2core product)."""
