import { create } from "@bufbuild/protobuf";
import { type Gpu, GpuSchema, GpuState as GpuStatePb, MigMode as MigModePb } from "@vmenv/api/agent/v1";
import { type GpuState, type GpuView, gpuName, type MigMode } from "./domain.js";

const states: Record<GpuState, GpuStatePb> = {
  available: GpuStatePb.AVAILABLE,
  assigned: GpuStatePb.ASSIGNED,
  unavailable: GpuStatePb.UNAVAILABLE,
};
const migModes: Record<MigMode, MigModePb> = {
  "not-supported": MigModePb.NOT_SUPPORTED,
  disabled: MigModePb.DISABLED,
  enabled: MigModePb.ENABLED,
};

export function fromPbGpuState(s: GpuStatePb): GpuState | undefined {
  return (Object.keys(states) as GpuState[]).find((k) => states[k] === s);
}

/** The domain's GPU → the API's. */
export function toPbGpu(g: GpuView): Gpu {
  return create(GpuSchema, {
    name: gpuName(g.address),
    pciAddress: g.address,
    vendorId: g.vendorId,
    vendorName: g.vendorName,
    deviceId: g.deviceId,
    deviceName: g.deviceName,
    model: g.model,
    numaNode: g.numaNode,
    iommuGroup: g.iommuGroup,
    iommuGroupDevices: [...g.iommuGroupDevices],
    driver: g.driver ?? "",
    originalDriver: g.originalDriver ?? "",
    memoryTotalBytes: g.memoryTotalBytes,
    memoryUsedBytes: g.memoryUsedBytes,
    migMode: migModes[g.migMode],
    state: states[g.state],
    stateMessage: g.stateMessage,
    vm: g.vm ?? "",
  });
}
