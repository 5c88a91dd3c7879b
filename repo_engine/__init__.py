"""repo-engine: a deduplicating, content-addressed backup repository for virtual-machine disks."""

__version__ = "0.1.0"
