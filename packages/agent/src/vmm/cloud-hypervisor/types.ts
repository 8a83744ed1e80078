/**
 * The JSON shapes that cloud-hypervisor's REST API exchanges, as far as vmenv uses them. Property names are
 * the wire names (snake_case) so that a body is built and read without renaming. Only the fields vmenv
 * sets or reads are declared; `contract.test.ts` checks every body built from these types against the
 * published OpenAPI document, with unknown properties rejected, so a misspelt field fails a test instead
 * of being silently ignored by the VMM.
 *
 * Sizes are bytes as JSON numbers (the API's int64); every value vmenv sends is a safe integer.
 */

/** The VM's lifecycle state as `vm.info` reports it. */
export type VmState = "Created" | "Running" | "Shutdown" | "Paused" | "BreakPoint";

/** Where a serial port or console goes. */
export type ConsoleMode = "Off" | "Pty" | "Tty" | "File" | "Socket" | "Null";

/** Disk image format; cloud-hypervisor guesses it from the image's header when absent. */
export type ImageType = "FixedVhd" | "Qcow2" | "Raw" | "Vhdx" | "Unknown";

export interface CpuAffinity {
  vcpu: number;
  host_cpus: number[];
}

export interface CpusConfig {
  boot_vcpus: number;
  max_vcpus: number;
  affinity?: CpuAffinity[];
}

export interface MemoryZoneConfig {
  id: string;
  size: number;
  shared?: boolean;
  hugepages?: boolean;
  hugepage_size?: number;
  host_numa_node?: number;
}

export interface MemoryConfig {
  size: number;
  hotplug_size?: number;
  shared?: boolean;
  hugepages?: boolean;
  hugepage_size?: number;
  zones?: MemoryZoneConfig[];
}

export interface PayloadConfig {
  firmware?: string;
  kernel?: string;
  cmdline?: string;
  initramfs?: string;
}

export interface DiskConfig {
  id?: string;
  path?: string;
  readonly?: boolean;
  direct?: boolean;
  serial?: string;
  vhost_user?: boolean;
  vhost_socket?: string;
  image_type?: ImageType;
}

export interface NetConfig {
  id?: string;
  tap?: string;
  mac?: string;
  mtu?: number;
  num_queues?: number;
}

/** A VFIO device (a GPU, a NIC VF …) given by its sysfs path. */
export interface DeviceConfig {
  id?: string;
  path?: string;
  iommu?: boolean;
}

export interface SerialConfig {
  mode: ConsoleMode;
  file?: string;
  socket?: string;
}

export interface ConsoleConfig {
  mode: ConsoleMode;
  file?: string;
  socket?: string;
}

export interface NumaConfig {
  guest_numa_id: number;
  cpus?: number[];
  memory_zones?: string[];
}

/** The body of `vm.create`, and `vm.info`'s `config`. `payload` is the only field the API requires. */
export interface VmConfig {
  cpus?: CpusConfig;
  memory?: MemoryConfig;
  payload: PayloadConfig;
  disks?: DiskConfig[];
  net?: NetConfig[];
  serial?: SerialConfig;
  console?: ConsoleConfig;
  devices?: DeviceConfig[];
  numa?: NumaConfig[];
}

/** What `vm.info` answers, less the device tree. */
export interface VmInfo {
  config: VmConfig;
  state: VmState;
  /** Guest memory currently plugged, in bytes (boot size plus hotplugged, less the balloon). */
  memory_actual_size?: number;
}

/** What `vmm.ping` answers. */
export interface VmmPingResponse {
  version: string;
  build_version?: string;
  pid?: number;
  features?: string[];
}

/** Per-device counters: device id → counter name → value. */
export type VmCounters = Record<string, Record<string, number>>;

/** Where a hot-plugged device landed on the guest's PCI bus. */
export interface PciDeviceInfo {
  id: string;
  bdf: string;
}

/** The body of `vm.resize`: each field is optional, absent ones are left as they are. */
export interface VmResize {
  desired_vcpus?: number;
  desired_ram?: number;
  desired_balloon?: number;
}

export interface VmRemoveDevice {
  id: string;
}

export interface VmSnapshotConfig {
  /** `file:///dir`: a directory cloud-hypervisor writes the snapshot into. */
  destination_url: string;
}

export interface RestoreConfig {
  /** `file:///dir` of a snapshot. */
  source_url: string;
  /** Touch all guest memory at restore instead of faulting it in on use. */
  prefault?: boolean;
}

export interface SendMigrationData {
  /** `unix:/path` or `tcp:host:port`. */
  destination_url: string;
  /** Same-host migration over a Unix socket passing the memory's file descriptors (needs shared memory). */
  local?: boolean;
}

export interface ReceiveMigrationData {
  /** `unix:/path` or `tcp:addr:port`. */
  receiver_url: string;
}
