"""The repository format layer: config, packs, index, block maps, restore points, locks.

The format is written against a store of immutable named objects (`store/`): the config, packs,
block maps and point manifests are objects, and no layer above this package names a file of the
repository or learns where the bytes live. The LMDB index and the lock files stay local files
under the local store's root (`LocalStore.root`).

This package imports nothing from the backup, restore, maintenance, sources or CLI layers.
"""
