"""Disk sources: where a backup's bytes and change lists come from (image files, vSphere, NBD)."""
