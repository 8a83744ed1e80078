import type { EventEmitter } from "node:events";
import type { VolumeExport } from "../block/ports.js";
import type { Accelerator, VmmKind, VmSpec } from "./domain.js";
import type { VmmMigration } from "./migration-domain.js";

/** Where one VM's files live: everything the agent needs to find its VMM again after a restart. */
export interface VmPaths {
  dir: string;
  /** The agent's record of the VM. */
  record: string;
  /** VMM control socket (QMP for QEMU, the REST API for cloud-hypervisor). */
  control: string;
  /** Serial console socket (input and live output). */
  serialSocket: string;
  /** Everything the serial console printed, appended by the VMM itself. */
  serialLog: string;
  /** The VMM's pid. */
  pidFile: string;
}

/** A disk as the VMM attaches it. */
export interface AttachedDisk {
  /** Device id (unique in the VM). */
  id: string;
  path: string;
  format: "raw" | "qcow2";
  readOnly: boolean;
  serial: string;
  /** PCIe root port (QEMU) the disk sits behind. */
  slot: number;
  /**
   * Set when a storage daemon serves the volume: the VMM connects to its vhost-user-blk or NBD socket
   * instead of opening `path` (vhost-user-blk needs the VM's memory shared, which QEMU VMs always are).
   */
  export?: VolumeExport;
}

/** A NIC as the VMM attaches it: a tap on the host. */
export interface AttachedNic {
  id: string;
  tap: string;
  mac: string;
  slot: number;
}

/** A GPU as the VMM attaches it: a PCI device of the host on vfio-pci, with its other functions. */
export interface AttachedGpu {
  id: string;
  /** Host PCI address of function 0, e.g. "0000:41:00.0". */
  host: string;
  /** The GPU's other functions (its HDMI audio), passed through beside it in the same guest slot. */
  functions: string[];
  /** PCIe root port it sits behind. */
  slot: number;
}

/** PCIe root ports every QEMU VM gets, so that devices can be hot-plugged behind them. */
export const HOTPLUG_SLOTS = 8;

export interface LaunchRequest {
  id: string;
  spec: VmSpec;
  accelerator: Accelerator;
  paths: VmPaths;
  /** Start with vCPUs stopped. */
  paused: boolean;
  /** Disks attached from the start. */
  disks: AttachedDisk[];
  /** NICs attached from the start. */
  nics: AttachedNic[];
  /** GPUs passed through from the start (QEMU only). */
  gpus?: AttachedGpu[];
  /**
   * Start from saved state instead of booting: the VMM listens on this Unix socket for the state
   * (`RunningVmm.saveState`'s output), which the agent then streams in. "defer": wait for a live
   * migration (`RunningVmm.migration().listen`).
   */
  incoming?: string;
}

/** Why a VMM process ended, as far as its control channel told. */
export type ExitCause = "guest-shutdown" | "host-request" | "unknown";

/** A running VMM process the agent holds a control connection to. */
export interface RunningVmm extends EventEmitter<{ exit: [ExitCause]; reset: []; stop: []; resume: [] }> {
  readonly pid: number;
  /** "running" or "paused" (vCPUs stopped), as the VMM reports it. */
  status(): Promise<"running" | "paused">;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Hard reset of the guest (same process). */
  reset(): Promise<void>;
  /** ACPI power button: the guest decides to shut down. */
  powerdown(): Promise<void>;
  /** Ends the VMM process now (its guest gets no say), waiting until it is gone. */
  kill(): Promise<void>;
  /** Resolves when the process has exited. */
  exited(): Promise<ExitCause>;
  /** Closes the agent's control connection; the VMM keeps running. */
  detach(): void;
  /**
   * Writes the VM's memory and device state to the Unix socket at `socketPath` (the agent listens there
   * and stores what comes). The guest should be paused, for a consistent image; it stays paused.
   */
  saveState(socketPath: string, signal?: AbortSignal): Promise<void>;
  /** For a VMM launched with `incoming`: resolves when the state has been loaded (vCPUs still stopped). */
  incomingDone(signal?: AbortSignal): Promise<void>;
  /** Plugs vCPUs in until the VM has `total` (up to its maximum). */
  hotplugVcpus(total: number): Promise<void>;
  /** Plugs in `bytes` more memory as one DIMM. */
  hotplugMemory(bytes: bigint): Promise<void>;
  /** Hot-plugs a disk; nothing of it remains when this fails. */
  attachDisk(disk: AttachedDisk): Promise<void>;
  /** Hot-unplugs a disk once the guest has released it; fails (and leaves it attached) after `timeoutMs`. */
  detachDisk(id: string, timeoutMs: number): Promise<void>;
  /** Hot-plugs a NIC on its tap; nothing of it remains when this fails. */
  attachNic(nic: AttachedNic): Promise<void>;
  /** Hot-unplugs a NIC once the guest has released it. */
  detachNic(id: string, timeoutMs: number): Promise<void>;
  /** Debugging passthrough to the VMM's own protocol (QMP for QEMU). */
  passthrough(command: string, args: Record<string, unknown> | undefined): Promise<unknown>;
  /** Hot-plugs a GPU (vfio-pci); nothing of it remains when this fails. Absent: the VMM cannot. */
  attachGpu?(gpu: AttachedGpu): Promise<void>;
  /** Hot-unplugs a GPU once the guest has released it. */
  detachGpu?(id: string, timeoutMs: number): Promise<void>;
  /** What the VMM tells about the VM's use of resources, for statistics (diagnostics). */
  counters(): Promise<VmmCounters>;
  /** Live migration of this VMM (docs/adr/0015). Absent: the VMM cannot migrate. */
  migration?(): VmmMigration;
}

/** I/O counters of one disk, cumulative since the VMM started. */
export interface DiskCounters {
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
  flushOps: number;
  readTimeNs: number;
  writeTimeNs: number;
}

/** What a VMM reports about a VM (QEMU: QMP queries; cloud-hypervisor: `vm.counters`). */
export interface VmmCounters {
  /** Host thread of each vCPU; empty when the VMM does not say (the caller may look for `vcpuN` threads). */
  vcpuThreads: { index: number; threadId: number }[];
  /** The balloon, when the VM has one: memory it leaves the guest, and what the guest reports. */
  balloon:
    | { actualBytes: number; freeBytes?: number; availableBytes?: number; totalBytes?: number }
    | undefined;
  /** Per disk device id. */
  disks: Record<string, DiskCounters>;
}

/** A VMM implementation: QEMU, cloud-hypervisor. */
export interface VmmDriver {
  readonly kind: VmmKind;
  /** Whether this host can run it, and why not. */
  availability(): Promise<{ available: true } | { available: false; reason: string }>;
  /** Starts the VMM detached (it outlives the agent) and connects to it. */
  launch(req: LaunchRequest, signal?: AbortSignal): Promise<RunningVmm>;
  /** Reconnects to a VMM a previous agent started; undefined when it is not running any more. */
  adopt(paths: VmPaths, pid: number): Promise<RunningVmm | undefined>;
}
