/**
 * Request bodies for cloud-hypervisor, built from {@link ChLaunchSpec}: what vmenv wants of a VM, in its own
 * words (bytes, device ids, a boot method), free of the VMM's field names. Pure functions: no I/O, so the
 * driver and the tests share them and `contract.test.ts` can check their output against the published
 * schema.
 *
 * The builders check what the schema cannot express (vCPU and memory arithmetic, unique device ids, MAC
 * and tap name syntax) and throw {@link ChConfigError} naming the offending field; the VMM would otherwise
 * refuse the body with a message that names none.
 */
import type {
  CpusConfig,
  DeviceConfig,
  DiskConfig,
  MemoryConfig,
  MemoryZoneConfig,
  NetConfig,
  NumaConfig,
  PayloadConfig,
  SerialConfig,
  VmConfig,
  VmResize,
} from "./types.js";

/** A size in bytes; bigint is accepted because vmenv's API carries 64-bit sizes as bigint. */
export type ByteSize = number | bigint;

/** Boot a Linux kernel directly (no firmware). */
export interface ChKernelBoot {
  kind: "kernel";
  /** Path of the kernel image on the host (vmlinux, or bzImage where the VMM accepts it). */
  kernel: string;
  /** Path of an initramfs on the host. */
  initrd?: string;
  /** Kernel command line; name the serial console here (e.g. `console=ttyS0`). */
  cmdline: string;
}

/** Boot a firmware image (e.g. a UEFI build for cloud-hypervisor) that boots the disks. */
export interface ChFirmwareBoot {
  kind: "firmware";
  firmware: string;
}

/** A block device: a host file or block device (`path`), or a vhost-user-blk backend (`vhostUserSocket`). */
export interface ChDiskSpec {
  /** Device id, unique within the VM; the key for hot-unplug. */
  id: string;
  /** Image file or block device. Exactly one of `path` and `vhostUserSocket`. */
  path?: string;
  /** Unix socket of a vhost-user-blk backend; guest memory is then shared. */
  vhostUserSocket?: string;
  readOnly?: boolean;
  /** Serial the guest sees (`/dev/disk/by-id/virtio-<serial>`). */
  serial?: string;
  /** Image format. Pin it: left unset, the VMM guesses from the image's first bytes. */
  format?: "raw" | "qcow2";
  /** Open with O_DIRECT (bypass the host page cache). */
  direct?: boolean;
}

/** A virtio-net device on an existing tap. */
export interface ChNicSpec {
  id: string;
  /** Name of the tap interface, which the network backend has created. */
  tap: string;
  /** Guest MAC address, `aa:bb:cc:dd:ee:ff`, unicast. */
  mac: string;
}

/** Where the guest's first serial port goes. The virtio console is always off. */
export type ChSerialSpec =
  | { kind: "file"; path: string }
  | { kind: "pty" }
  | { kind: "socket"; path: string }
  | { kind: "off" };

/** A guest NUMA node: its vCPUs and memory, optionally bound to a host node. */
export interface ChNumaNodeSpec {
  guestNode: number;
  vcpus: number[];
  memoryBytes: ByteSize;
  hostNode?: number;
}

/** A PCI device handed to the guest with VFIO. */
export interface ChGpuSpec {
  id: string;
  /** The device's sysfs directory, e.g. `/sys/bus/pci/devices/0000:41:00.0`, bound to vfio-pci. */
  sysfsPath: string;
}

/** What to launch, in vmenv's terms. */
export interface ChLaunchSpec {
  /** vmenv's VM id. The VMM's config has no name field; the id only labels errors here. */
  id: string;
  vcpus: number;
  /** vCPUs the VM can grow to by hotplug. Default: `vcpus`. */
  maxVcpus?: number;
  memoryBytes: ByteSize;
  /** Memory the VM can grow to by hotplug; the hotplug room is `maxMemoryBytes − memoryBytes`. */
  maxMemoryBytes?: ByteSize;
  /** Back guest memory with huge pages; `true` takes the host's default huge page size. */
  hugepages?: boolean | { pageSizeBytes: ByteSize };
  /**
   * Map guest memory shared. Needed by vhost-user backends (set automatically when a disk is one) and by
   * same-host (`local`) migration.
   */
  sharedMemory?: boolean;
  boot: ChKernelBoot | ChFirmwareBoot;
  disks?: ChDiskSpec[];
  nics?: ChNicSpec[];
  serial: ChSerialSpec;
  /** Pin vCPUs to host CPUs. */
  cpuAffinity?: { vcpu: number; hostCpus: number[] }[];
  /** Guest NUMA topology. Memory is then given per node; hotplug room is not supported with it. */
  numaNodes?: ChNumaNodeSpec[];
  gpus?: ChGpuSpec[];
}

/** A launch spec or device spec that cannot be turned into a valid body. */
export class ChConfigError extends Error {
  override readonly name = "ChConfigError";
  /** The offending field of the spec, e.g. `disks[1].path`. */
  readonly field: string;

  constructor(field: string, message: string) {
    super(`${field}: ${message}`);
    this.field = field;
  }
}

const PAGE_SIZE = 4096;
const MAC_RE = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/i;
/** Linux interface names: at most 15 bytes, no slash, no whitespace, not "." or "..". */
const IFNAME_RE = /^[^\s/:]{1,15}$/;

/** The `vm.create` body for a launch spec. */
export function buildVmConfig(spec: ChLaunchSpec): VmConfig {
  nonEmpty("id", spec.id);
  const cpus = buildCpus(spec);
  const disks = (spec.disks ?? []).map((d, i) => buildDiskConfig(d, `disks[${i}]`));
  const net = (spec.nics ?? []).map((n, i) => buildNetConfig(n, `nics[${i}]`));
  const devices = (spec.gpus ?? []).map((g, i) => buildVfioDeviceConfig(g, `gpus[${i}]`));
  uniqueIds([
    ...(spec.disks ?? []).map((d, i) => [`disks[${i}].id`, d.id] as const),
    ...(spec.nics ?? []).map((n, i) => [`nics[${i}].id`, n.id] as const),
    ...(spec.gpus ?? []).map((g, i) => [`gpus[${i}].id`, g.id] as const),
  ]);
  const shared = spec.sharedMemory === true || disks.some((d) => d.vhost_user === true);
  const { memory, numa } = buildMemory(spec, shared, cpus.max_vcpus);

  const config: VmConfig = {
    cpus,
    memory,
    payload: buildPayload(spec.boot),
    serial: buildSerial(spec.serial),
    console: { mode: "Off" },
  };
  if (disks.length > 0) config.disks = disks;
  if (net.length > 0) config.net = net;
  if (devices.length > 0) config.devices = devices;
  if (numa !== undefined) config.numa = numa;
  return config;
}

/** A disk's body, for `vm.create`'s `disks` and for `vm.add-disk`. */
export function buildDiskConfig(disk: ChDiskSpec, field = "disk"): DiskConfig {
  deviceId(`${field}.id`, disk.id);
  const body: DiskConfig = { id: disk.id };
  if ((disk.path === undefined) === (disk.vhostUserSocket === undefined)) {
    throw new ChConfigError(field, "give exactly one of path and vhostUserSocket");
  }
  if (disk.path !== undefined) {
    nonEmpty(`${field}.path`, disk.path);
    body.path = disk.path;
  }
  if (disk.vhostUserSocket !== undefined) {
    nonEmpty(`${field}.vhostUserSocket`, disk.vhostUserSocket);
    body.vhost_user = true;
    body.vhost_socket = disk.vhostUserSocket;
  }
  body.readonly = disk.readOnly === true;
  if (disk.direct === true) body.direct = true;
  if (disk.serial !== undefined) {
    nonEmpty(`${field}.serial`, disk.serial);
    body.serial = disk.serial;
  }
  if (disk.format !== undefined) body.image_type = disk.format === "raw" ? "Raw" : "Qcow2";
  return body;
}

/** A NIC's body, for `vm.create`'s `net` and for `vm.add-net`. */
export function buildNetConfig(nic: ChNicSpec, field = "nic"): NetConfig {
  deviceId(`${field}.id`, nic.id);
  if (!IFNAME_RE.test(nic.tap) || nic.tap === "." || nic.tap === "..") {
    throw new ChConfigError(`${field}.tap`, `not an interface name: ${JSON.stringify(nic.tap)}`);
  }
  if (!MAC_RE.test(nic.mac)) {
    throw new ChConfigError(`${field}.mac`, `not a MAC address: ${JSON.stringify(nic.mac)}`);
  }
  if ((Number.parseInt(nic.mac.slice(0, 2), 16) & 1) === 1) {
    throw new ChConfigError(`${field}.mac`, `${nic.mac} is a multicast address`);
  }
  return { id: nic.id, tap: nic.tap, mac: nic.mac.toLowerCase() };
}

/** A VFIO device's body, for `vm.create`'s `devices` and for `vm.add-device`. */
export function buildVfioDeviceConfig(gpu: ChGpuSpec, field = "gpu"): DeviceConfig {
  deviceId(`${field}.id`, gpu.id);
  if (!gpu.sysfsPath.startsWith("/")) {
    throw new ChConfigError(`${field}.sysfsPath`, `must be an absolute sysfs path, got ${gpu.sysfsPath}`);
  }
  return { id: gpu.id, path: gpu.sysfsPath };
}

/** The `vm.resize` body; absent fields are left unchanged by the VMM. */
export function buildResize(target: {
  vcpus?: number;
  memoryBytes?: ByteSize;
  balloonBytes?: ByteSize;
}): VmResize {
  const body: VmResize = {};
  if (target.vcpus !== undefined) body.desired_vcpus = positiveInt("vcpus", target.vcpus);
  if (target.memoryBytes !== undefined) body.desired_ram = pageMultiple("memoryBytes", target.memoryBytes);
  if (target.balloonBytes !== undefined) body.desired_balloon = bytes("balloonBytes", target.balloonBytes);
  if (Object.keys(body).length === 0) throw new ChConfigError("resize", "nothing to resize");
  return body;
}

function buildCpus(spec: ChLaunchSpec): CpusConfig {
  const boot = positiveInt("vcpus", spec.vcpus);
  const max = positiveInt("maxVcpus", spec.maxVcpus ?? spec.vcpus);
  if (max < boot) throw new ChConfigError("maxVcpus", `${max} is less than vcpus (${boot})`);
  const cpus: CpusConfig = { boot_vcpus: boot, max_vcpus: max };
  if (spec.cpuAffinity !== undefined && spec.cpuAffinity.length > 0) {
    const seen = new Set<number>();
    cpus.affinity = spec.cpuAffinity.map((a, i) => {
      const field = `cpuAffinity[${i}]`;
      const vcpu = vcpuIndex(`${field}.vcpu`, a.vcpu, max);
      if (seen.has(vcpu)) throw new ChConfigError(`${field}.vcpu`, `vCPU ${vcpu} is pinned twice`);
      seen.add(vcpu);
      if (a.hostCpus.length === 0) throw new ChConfigError(`${field}.hostCpus`, "empty");
      const hostCpus = a.hostCpus.map((c, j) => nonNegativeInt(`${field}.hostCpus[${j}]`, c));
      return { vcpu, host_cpus: hostCpus };
    });
  }
  return cpus;
}

function buildMemory(
  spec: ChLaunchSpec,
  shared: boolean,
  maxVcpus: number,
): { memory: MemoryConfig; numa?: NumaConfig[] } {
  const size = pageMultiple("memoryBytes", spec.memoryBytes);
  if (size === 0) throw new ChConfigError("memoryBytes", "must be positive");
  const max = spec.maxMemoryBytes === undefined ? size : pageMultiple("maxMemoryBytes", spec.maxMemoryBytes);
  if (max < size) throw new ChConfigError("maxMemoryBytes", `${max} is less than memoryBytes (${size})`);
  const hugepages = spec.hugepages ?? false;
  const hugepageSize =
    typeof hugepages === "object" ? bytes("hugepages.pageSizeBytes", hugepages.pageSizeBytes) : undefined;
  if (hugepageSize !== undefined && (hugepageSize === 0 || size % hugepageSize !== 0)) {
    throw new ChConfigError("hugepages.pageSizeBytes", `memoryBytes is not a multiple of ${hugepageSize}`);
  }
  const backing = (target: MemoryConfig | MemoryZoneConfig): void => {
    if (shared) target.shared = true;
    if (hugepages !== false) target.hugepages = true;
    if (hugepageSize !== undefined) target.hugepage_size = hugepageSize;
  };

  if (spec.numaNodes === undefined || spec.numaNodes.length === 0) {
    const memory: MemoryConfig = { size };
    if (max > size) memory.hotplug_size = max - size;
    backing(memory);
    return { memory };
  }

  // Guest NUMA: the memory is the sum of one zone per node and the top-level size must be 0.
  if (max > size) {
    throw new ChConfigError("maxMemoryBytes", "memory hotplug with guest NUMA nodes is not supported");
  }
  const zones: MemoryZoneConfig[] = [];
  const numa: NumaConfig[] = [];
  const nodes = new Set<number>();
  const placed = new Set<number>();
  let total = 0;
  spec.numaNodes.forEach((node, i) => {
    const field = `numaNodes[${i}]`;
    const id = nonNegativeInt(`${field}.guestNode`, node.guestNode);
    if (nodes.has(id)) throw new ChConfigError(`${field}.guestNode`, `node ${id} given twice`);
    nodes.add(id);
    const zone: MemoryZoneConfig = {
      id: `mem${id}`,
      size: pageMultiple(`${field}.memoryBytes`, node.memoryBytes),
    };
    if (node.hostNode !== undefined) zone.host_numa_node = nonNegativeInt(`${field}.hostNode`, node.hostNode);
    backing(zone);
    total += zone.size;
    zones.push(zone);
    const cpus = node.vcpus.map((c, j) => {
      const vcpu = vcpuIndex(`${field}.vcpus[${j}]`, c, maxVcpus);
      if (placed.has(vcpu)) throw new ChConfigError(`${field}.vcpus[${j}]`, `vCPU ${vcpu} is in two nodes`);
      placed.add(vcpu);
      return vcpu;
    });
    numa.push({ guest_numa_id: id, cpus, memory_zones: [zone.id] });
  });
  if (total !== size) {
    throw new ChConfigError("numaNodes", `node memory adds up to ${total}, not memoryBytes (${size})`);
  }
  return { memory: { size: 0, zones }, numa };
}

function buildPayload(boot: ChKernelBoot | ChFirmwareBoot): PayloadConfig {
  if (boot.kind === "firmware") {
    nonEmpty("boot.firmware", boot.firmware);
    return { firmware: boot.firmware };
  }
  nonEmpty("boot.kernel", boot.kernel);
  const payload: PayloadConfig = { kernel: boot.kernel, cmdline: boot.cmdline };
  if (boot.initrd !== undefined) {
    nonEmpty("boot.initrd", boot.initrd);
    payload.initramfs = boot.initrd;
  }
  return payload;
}

function buildSerial(serial: ChSerialSpec): SerialConfig {
  switch (serial.kind) {
    case "file":
      nonEmpty("serial.path", serial.path);
      return { mode: "File", file: serial.path };
    case "socket":
      nonEmpty("serial.path", serial.path);
      return { mode: "Socket", socket: serial.path };
    case "pty":
      return { mode: "Pty" };
    case "off":
      return { mode: "Off" };
  }
}

function uniqueIds(ids: readonly (readonly [field: string, id: string])[]): void {
  const seen = new Map<string, string>();
  for (const [field, id] of ids) {
    const first = seen.get(id);
    if (first !== undefined) throw new ChConfigError(field, `device id ${id} is also used by ${first}`);
    seen.set(id, field);
  }
}

/** Device ids: non-empty, and not starting with "_", which the VMM uses for the ids it makes up. */
function deviceId(field: string, id: string): void {
  nonEmpty(field, id);
  if (id.startsWith("_")) throw new ChConfigError(field, `${id}: ids starting with "_" are the VMM's`);
}

function nonEmpty(field: string, value: string): void {
  if (value.length === 0) throw new ChConfigError(field, "empty");
}

function positiveInt(field: string, n: number): number {
  if (!Number.isSafeInteger(n) || n < 1)
    throw new ChConfigError(field, `must be a positive integer, got ${n}`);
  return n;
}

function nonNegativeInt(field: string, n: number): number {
  if (!Number.isSafeInteger(n) || n < 0) throw new ChConfigError(field, `must be an integer ≥ 0, got ${n}`);
  return n;
}

function vcpuIndex(field: string, n: number, maxVcpus: number): number {
  const vcpu = nonNegativeInt(field, n);
  if (vcpu >= maxVcpus) throw new ChConfigError(field, `vCPU ${vcpu} does not exist (maxVcpus ${maxVcpus})`);
  return vcpu;
}

function bytes(field: string, size: ByteSize): number {
  const n = typeof size === "bigint" ? Number(size) : size;
  if (!Number.isSafeInteger(n) || n < 0 || (typeof size === "bigint" && BigInt(n) !== size)) {
    throw new ChConfigError(field, `not a byte count: ${size}`);
  }
  return n;
}

function pageMultiple(field: string, size: ByteSize): number {
  const n = bytes(field, size);
  if (n % PAGE_SIZE !== 0) throw new ChConfigError(field, `${n} is not a multiple of ${PAGE_SIZE}`);
  return n;
}
