"""The vSphere source: back up and restore VMware VMs through vCenter/ESXi (pyvmomi, the control
plane) and VDDK (vddk_ext, the data plane). Facts and pitfalls: shared VMWARE.md; user guide:
docs/VSPHERE.md.

Words: *changeId* — CBT's cursor of a disk ("<uuid>/<sequence>"), stored as the disk's cursor
in each restore point; *our snapshots* — named with `snapshots.PREFIX`, so a later run finds and
removes what a crashed one left; *full-next mark* — a small file in the repository saying that a
restore wrote to a VM, so CBT cannot be trusted for its next backup (`marks.py`).

Backup (`frozen_vm` in source.py, driven by `repo-engine backup vsphere`):
1. Connect (certificate verified, pinned by thumbprint, or `--insecure`), find the VM.
2. Remove leftover snapshots of ours; enable CBT if off and cycle a snapshot so it takes effect.
3. Create our snapshot, quiesced unless told not to; on a quiesce fault, crash-consistent.
4. Read the disks from the snapshot's config; skip independent disks (noted in the point).
5. Per disk: QueryChangedDiskAreas from the parent point's changeId, paged to the capacity ("*"
   on a first backup); a full read, with the reason, when CBT cannot be trusted.
6. The pipeline reads those extents through VDDK and stores the point, the VM's configuration
   serialized with the connection's API version, each disk's changeId.
7. Always remove the snapshot (also on errors and Ctrl-C), consolidate if vCenter asks.

Restore (repo_engine/restore/vsphere.py): in place — VM off, PrepareForAccess, snapshot (the VM
now runs on deltas), write the blocks that differ from the point (CBT since the point, else read
and compared) into the deltas, remove the snapshot (merging them); on failure revert to the
snapshot, so a restore is all or nothing; the VM is marked for a full next backup only when
something was written. Or as a new VM from the saved configuration, writing every non-zero
block, deleting the half-made VM on failure.
"""

from .errors import VSphereError

__all__ = ["VSphereError"]
