import { type Duration, timestampDate } from "@bufbuild/protobuf/wkt";
import { AcceleratorKind, type HostInfo, VmmKind } from "@vmenv/api/agent/v1";
import { bytes, cpuList, duration, keyValues, table } from "./output.js";

const seconds = (d: Duration | undefined) => (d ? Number(d.seconds) + d.nanos / 1e9 : 0);
const accelName = (k: AcceleratorKind) =>
  (AcceleratorKind[k] ?? "?").replace(/^ACCELERATOR_KIND_/, "").toLowerCase();
const vmmName = (k: VmmKind) =>
  (VmmKind[k] ?? "?")
    .replace(/^VMM_KIND_/, "")
    .toLowerCase()
    .replace("_", "-");

/** `vmenv host info` as a person reads it. */
export function hostInfoTable(h: HostInfo): string {
  const cpu = h.cpu;
  const summary = keyValues([
    [
      "Host",
      `${h.hostname} (${h.architecture}, kernel ${h.kernelRelease}, up ${duration(seconds(h.hostUptime))})`,
    ],
    ["CPU", cpu ? `${cpu.model} (${cpu.vendor})` : "?"],
    ["Topology", cpu ? `${cpu.sockets} socket(s), ${cpu.cores} cores, ${cpu.threads} threads` : "?"],
    ["Virt flags", cpu?.virtualizationFlags.join(" ") || "none"],
    [
      "Memory",
      h.memory ? `${bytes(h.memory.availableBytes)} available of ${bytes(h.memory.totalBytes)}` : "?",
    ],
    ["Accelerator", `${accelName(h.effectiveAccelerator)} (for new VMs)`],
    [
      "Agent",
      `vmenv-agent ${h.agentVersion}, up ${duration(seconds(h.agentUptime))}` +
        (h.agentStartTime ? ` (since ${timestampDate(h.agentStartTime).toISOString()})` : ""),
    ],
  ]);
  const numa = table(
    ["NUMA", "CPUS", "MEMORY", "FREE", "HUGEPAGES"],
    h.numaNodes.map((n) => [
      String(n.id),
      cpuList(n.cpus),
      bytes(n.memoryTotalBytes),
      bytes(n.memoryFreeBytes),
      n.hugepages.map((p) => `${bytes(p.pageSizeBytes)}: ${p.freePages}/${p.totalPages}`).join(", ") || "-",
    ]),
  );
  const huge = table(
    ["HUGEPAGE SIZE", "TOTAL", "FREE"],
    h.hugepages.map((p) => [bytes(p.pageSizeBytes), String(p.totalPages), String(p.freePages)]),
  );
  const vmms = table(
    ["VMM", "AVAILABLE", "VERSION", "PATH / REASON"],
    h.vmms.map((v) => [
      vmmName(v.kind),
      v.available ? "yes" : "no",
      v.version || "-",
      v.available ? v.path : v.unavailableReason,
    ]),
  );
  const accels = table(
    ["ACCELERATOR", "PRESENT", "USABLE", "PROBE"],
    h.accelerators.map((a) => [
      accelName(a.kind),
      a.present ? "yes" : "no",
      a.usable ? "yes" : "no",
      a.detail,
    ]),
  );
  const c = h.capacity;
  const capacity = c
    ? table(
        ["CAPACITY", "ALLOCATED", "ALLOCATABLE", "NOTE"],
        [
          [
            "vCPUs",
            String(c.vcpusAllocated),
            String(c.vcpusAllocatable),
            `overcommit ${c.cpuOvercommitRatio}, ${c.reservedCpus} CPU(s) kept for the host`,
          ],
          [
            "memory",
            bytes(c.memoryAllocatedBytes),
            bytes(c.memoryAllocatableBytes),
            `${bytes(c.reservedMemoryBytes)} kept for the host`,
          ],
          ...c.hugepages.map((p) => [
            `hugepages ${bytes(p.pageSizeBytes)}`,
            String(p.pagesAllocated),
            String(p.pagesAllocatable),
            "pages",
          ]),
          ["GPUs", String(c.gpusTotal - c.gpusFree), String(c.gpusTotal), `${c.gpusFree} free`],
          [
            "GPU memory",
            bytes(c.gpuMemoryTotalBytes - c.gpuMemoryFreeBytes),
            bytes(c.gpuMemoryTotalBytes),
            `${bytes(c.gpuMemoryFreeBytes)} free`,
          ],
          ["VMs", String(c.vms), "-", `${c.runningVms} running`],
          ...c.numaNodes.map((n) => [
            `node ${n.id} vCPUs`,
            String(n.vcpusAllocated),
            String(n.vcpusAllocatable),
            `memory ${bytes(n.memoryAllocatableBytes)}, GPUs ${n.gpusFree}/${n.gpusTotal} free`,
          ]),
        ],
      )
    : "";
  return [summary, numa, huge, capacity, vmms, accels].filter(Boolean).join("\n\n");
}
