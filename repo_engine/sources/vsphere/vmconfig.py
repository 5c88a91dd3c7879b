"""The VM's configuration as a restore point keeps it: pyVmomi's SOAP serialization of
`vim.vm.ConfigInfo` with the connection's API version (without `version=` newer fields are
silently dropped), plus a small summary for people and for restore-as-new."""

from __future__ import annotations

from typing import Any

FORMAT = 1


def serialize(config: Any, version: str) -> str:
    from pyVmomi import SoapAdapter

    data = SoapAdapter.Serialize(config, version=version)
    return data.decode() if isinstance(data, bytes) else str(data)


def deserialize(xml: str) -> Any:
    from pyVmomi import SoapAdapter, vim

    return SoapAdapter.Deserialize(xml.encode(), vim.vm.ConfigInfo)


def summary(config: Any) -> dict:
    hw = config.hardware
    return {
        "name": config.name, "guest_id": config.guestId, "version": config.version,
        "firmware": config.firmware, "num_cpus": hw.numCPU,
        "cores_per_socket": hw.numCoresPerSocket, "memory_mb": hw.memoryMB,
        "instance_uuid": config.instanceUuid, "bios_uuid": config.uuid,
        "vm_path": config.files.vmPathName if config.files else None,
    }
