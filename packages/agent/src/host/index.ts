/**
 * Host inventory: what this machine offers to VMs and which accelerator actually runs guests.
 *
 * Wiring (in the agent's composition root):
 *
 *     const source = new HostInventorySource({ qemuBinary: config.qemuBinary });
 *     const accelerators = source
 *       .staticPart()
 *       .then((s) => probeAccelerators({ qemuPath: s.qemuPath, timeoutMs: 3000 }));
 *     const inventory: HostInventory = { ...(await source.read()), accelerators: await accelerators };
 */
export {
  type AcceleratorsProbeOptions,
  type AccelProbeOptions,
  type AccelProbeResult,
  DEFAULT_PROBE_TIMEOUT_MS,
  probeAccelerator,
  probeAccelerators,
} from "./accel-probe.js";
export {
  type AcceleratorInfo,
  type AcceleratorKind,
  type CpuinfoProcessor,
  type CpuSummary,
  type CpuTopologyEntry,
  type HostInventory,
  HostInventoryParseError,
  type HugepagePoolInfo,
  type MemorySummary,
  memorySummary,
  type NumaNodeInfo,
  nodeMemory,
  parseCloudHypervisorVersion,
  parseCount,
  parseCpuinfo,
  parseCpuList,
  parseHugepageDirName,
  parseMeminfo,
  parseQemuVersion,
  parseUptime,
  type QemuVersion,
  summarizeCpu,
  VIRTUALIZATION_FLAGS,
  type VmmBinaryInfo,
  type VmmKind,
} from "./inventory.js";
export {
  buildProbeKernel,
  DEFAULT_PROBE_SPIN_ITERATIONS,
  firstQemuComplaint,
  judgeProbeRun,
  PROBE_EXIT_STATUS,
  type ProbeRunOutcome,
  type ProbeVerdict,
} from "./probe-guest.js";
export {
  discoverVmms,
  findCloudHypervisor,
  findExecutable,
  findQemu,
  qemuBinaryName,
  type VmmDiscoveryOptions,
} from "./qemu.js";
export {
  HostInventorySource,
  type HostInventorySourceOptions,
  type HostSnapshot,
  type StaticHostFacts,
  type StaticNumaNode,
} from "./sysfs.js";
