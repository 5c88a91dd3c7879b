"""The repository format layer: config, packs, index, block maps, restore points, locks.

This package imports nothing from the backup, restore, maintenance, sources or CLI layers.
"""
