import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { type CapacityHost, type CapacityVm, checkFits, computeCapacity } from "./capacity.js";

const GIB = 1024n ** 3n;
const MIB = 1024n ** 2n;

/** Two nodes of 4 logical CPUs and 32 GiB each, 2 MiB huge pages. */
const twoNode: CapacityHost = {
  cpus: [0, 1, 2, 3, 4, 5, 6, 7],
  memoryBytes: 64n * GIB,
  numaNodes: [
    {
      id: 0,
      cpus: [0, 1, 4, 5],
      memoryTotalBytes: 32n * GIB,
      hugepages: [{ pageSizeBytes: 2n * MIB, totalPages: 512n }],
    },
    {
      id: 1,
      cpus: [2, 3, 6, 7],
      memoryTotalBytes: 32n * GIB,
      hugepages: [{ pageSizeBytes: 2n * MIB, totalPages: 512n }],
    },
  ],
  hugepages: [{ pageSizeBytes: 2n * MIB, totalPages: 1024n }],
};
/** The CI machines: 2 logical CPUs, 24 GiB, no NUMA. */
const ci: CapacityHost = {
  cpus: [0, 1],
  memoryBytes: 24n * GIB,
  numaNodes: [{ id: 0, cpus: [0, 1], memoryTotalBytes: 24n * GIB, hugepages: [] }],
  hugepages: [],
};
const vm = (
  id: string,
  vcpus: number,
  memoryBytes: bigint,
  hostCpus: number[] = [],
  running = true,
): CapacityVm => ({
  id,
  vcpus,
  memoryBytes,
  hostCpus,
  running,
});
const settings = { cpuOvercommit: 4, reservedCpus: 1, reservedMemoryBytes: 2n * GIB };

describe("capacity", () => {
  it("offers CPUs less reserved ones times the overcommit ratio, memory less the host's reserve", () => {
    const c = computeCapacity(
      twoNode,
      [vm("a", 4, 8n * GIB, [2, 3]), vm("b", 2, 4n * GIB, [], false)],
      [
        { numaNode: 1, memoryTotalBytes: 80n * GIB, state: "assigned" },
        { numaNode: 1, memoryTotalBytes: 80n * GIB, state: "available" },
        { numaNode: 0, memoryTotalBytes: 24n * GIB, state: "unavailable" },
      ],
      settings,
    );
    expect(c).toMatchObject({
      vcpusAllocatable: 28, // (8 − 1 reserved) × 4
      vcpusAllocated: 6,
      memoryAllocatableBytes: 62n * GIB,
      memoryAllocatedBytes: 12n * GIB,
      vms: 2,
      runningVms: 1,
      gpusTotal: 2,
      gpusFree: 1,
      gpuMemoryTotalBytes: 160n * GIB,
      gpuMemoryFreeBytes: 80n * GIB,
      hugepages: [{ pageSizeBytes: 2n * MIB, pagesAllocatable: 1024n, pagesAllocated: 0n }],
    });
    // CPU 0 (node 0) is the reserved one; "a" is pinned to node 1; the reserve comes from both nodes.
    expect(
      c.numaNodes.map((n) => [
        n.id,
        n.vcpusAllocatable,
        n.vcpusAllocated,
        n.memoryAllocatableBytes,
        n.gpusTotal,
        n.gpusFree,
      ]),
    ).toEqual([
      [0, 12, 0, 31n * GIB, 0, 0],
      [1, 16, 4, 31n * GIB, 2, 1],
    ]);
  });

  it("the default overcommit (16) fits what the tests and the 20-VM benchmark create on a 2-CPU host", () => {
    const s = { cpuOvercommit: 16, reservedCpus: 0, reservedMemoryBytes: 512n * MIB };
    const vms = Array.from({ length: 20 }, (_, i) => vm(`v${i}`, 1, 256n * MIB));
    expect(() => checkFits(ci, vms, vm("one-more", 2, 768n * MIB), s)).not.toThrow();
    expect(computeCapacity(ci, vms, [], s).vcpusAllocatable).toBe(32);
  });

  it("refuses a VM with too many vCPUs: RESOURCE_EXHAUSTED naming the VM and the resource, figures in the message", () => {
    const e = (() => {
      try {
        checkFits(ci, [vm("a", 6, GIB)], vm("big", 3, GIB), {
          cpuOvercommit: 4,
          reservedCpus: 0,
          reservedMemoryBytes: 0n,
        });
      } catch (err) {
        return err;
      }
    })() as VmenvError;
    expect(e).toBeInstanceOf(VmenvError);
    expect(e).toMatchObject({ code: "resource-exhausted", reason: "INSUFFICIENT_CAPACITY" });
    expect(e.metadata).toEqual({ vm: "vms/big", resource: "vcpus", requested: "3", available: "2" });
    expect(e.message).toBe(
      "vms/big does not fit on this host: it needs 3 vCPUs, and 2 are left (8 allocatable = 2 logical CPUs × overcommit 4; 6 allocated to other VMs)",
    );
  });

  it("refuses a VM whose memory does not fit beside the others", () => {
    const s = { cpuOvercommit: 16, reservedCpus: 0, reservedMemoryBytes: 512n * MIB };
    const others = [vm("a", 1, 20n * GIB)];
    expect(() => checkFits(ci, others, vm("b", 1, 3n * GIB), s)).not.toThrow();
    try {
      checkFits(ci, others, vm("b", 1, 4n * GIB), s);
      expect.unreachable();
    } catch (err) {
      expect((err as VmenvError).metadata).toMatchObject({
        resource: "memory",
        requested: "4096 MiB",
        available: "3584 MiB",
      });
      expect((err as VmenvError).message).toContain(
        "24576 MiB less 512 MiB kept for the host; 20480 MiB allocated to other VMs",
      );
    }
  });

  it("a VM pinned to one node must fit on that node", () => {
    const s = { cpuOvercommit: 1, reservedCpus: 0, reservedMemoryBytes: 0n };
    const others = [vm("a", 3, GIB, [0, 1])];
    expect(() => checkFits(twoNode, others, vm("b", 2, GIB, [2]), s)).not.toThrow();
    try {
      checkFits(twoNode, others, vm("b", 2, GIB, [4]), s);
      expect.unreachable();
    } catch (err) {
      expect((err as VmenvError).metadata).toMatchObject({ resource: "numa_nodes/0/vcpus", available: "1" });
    }
  });
});
