import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  AcceleratorKind,
  type HostCapacity,
  HostCapacitySchema,
  type HostInfo,
  HostInfoSchema,
  VmmKind,
} from "@vmenv/api/agent/v1";
import type { Capacity } from "./capacity.js";
import type { AcceleratorInfo, HostInventory, VmmBinaryInfo } from "./inventory.js";

const vmmKinds: Record<VmmBinaryInfo["kind"], VmmKind> = {
  qemu: VmmKind.QEMU,
  "cloud-hypervisor": VmmKind.CLOUD_HYPERVISOR,
};
const accelKinds: Record<AcceleratorInfo["kind"], AcceleratorKind> = {
  kvm: AcceleratorKind.KVM,
  tcg: AcceleratorKind.TCG,
};

/** What the handler adds to the inventory: the agent's own facts. */
export interface AgentFacts {
  version: string;
  startTimeMs: number;
  nowMs: number;
  effectiveAccelerator: AcceleratorInfo["kind"];
}

/** HostInventory (domain) → HostInfo (API). */
export function toHostInfo(inv: HostInventory, agent: AgentFacts): HostInfo {
  return create(HostInfoSchema, {
    hostname: inv.hostname,
    kernelRelease: inv.kernelRelease,
    architecture: inv.architecture,
    cpu: { ...inv.cpu, virtualizationFlags: [...inv.cpu.virtualizationFlags] },
    numaNodes: inv.numaNodes.map((n) => ({
      id: n.id,
      cpus: [...n.cpus],
      memoryTotalBytes: n.memoryTotalBytes,
      memoryFreeBytes: n.memoryFreeBytes,
      hugepages: n.hugepages.map((p) => ({ ...p })),
    })),
    memory: { ...inv.memory },
    hugepages: inv.hugepages.map((p) => ({ ...p })),
    vmms: inv.vmms.map((v) => ({
      kind: vmmKinds[v.kind],
      path: v.path ?? "",
      version: v.version ?? "",
      available: v.available,
      unavailableReason: v.unavailableReason ?? "",
    })),
    accelerators: inv.accelerators.map((a) => ({
      kind: accelKinds[a.kind],
      present: a.present,
      usable: a.usable,
      detail: a.detail,
      probeDuration: durationFromMs(Math.round(a.probeDurationMs)),
    })),
    // Until VMs, GPUs and stores exist on the agent (and its reservations and overcommit settings),
    // everything the host has is allocatable and nothing is allocated.
    capacity: {
      vcpusAllocatable: inv.cpu.threads,
      memoryAllocatableBytes: inv.memory.totalBytes,
      numaNodes: inv.numaNodes.map((n) => ({
        id: n.id,
        vcpusAllocatable: n.cpus.length,
        memoryAllocatableBytes: n.memoryTotalBytes,
      })),
    },
    effectiveAccelerator: accelKinds[agent.effectiveAccelerator],
    agentVersion: agent.version,
    agentStartTime: timestampFromMs(agent.startTimeMs),
    agentUptime: durationFromMs(agent.nowMs - agent.startTimeMs),
    hostUptime: durationFromMs(Math.round(inv.hostUptimeSeconds * 1000)),
  });
}

/** Capacity (domain) → HostCapacity (API). */
export function toPbCapacity(c: Capacity): HostCapacity {
  return create(HostCapacitySchema, {
    vcpusAllocatable: c.vcpusAllocatable,
    vcpusAllocated: c.vcpusAllocated,
    memoryAllocatableBytes: c.memoryAllocatableBytes,
    memoryAllocatedBytes: c.memoryAllocatedBytes,
    numaNodes: c.numaNodes.map((n) => ({ ...n, hugepages: n.hugepages.map((p) => ({ ...p })) })),
    gpusTotal: c.gpusTotal,
    gpusFree: c.gpusFree,
    gpuMemoryTotalBytes: c.gpuMemoryTotalBytes,
    gpuMemoryFreeBytes: c.gpuMemoryFreeBytes,
    vms: c.vms,
    runningVms: c.runningVms,
    cpuOvercommitRatio: c.cpuOvercommit,
    reservedCpus: c.reservedCpus,
    reservedMemoryBytes: c.reservedMemoryBytes,
    hugepages: c.hugepages.map((p) => ({ ...p })),
  });
}
