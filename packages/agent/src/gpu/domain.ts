/**
 * GPUs for passthrough: what a PCI display controller is, whether its IOMMU group can go to a VM, and
 * which devices move to vfio-pci with it. Plain TypeScript, no I/O.
 */
import { invalidArgument, notFound, VmenvError } from "@vmenv/rpc/errors";

/** One PCI function as sysfs shows it. */
export interface PciFunction {
  /** domain:bus:device.function, lower case, e.g. "0000:41:00.0". */
  address: string;
  vendorId: number;
  deviceId: number;
  /** 24-bit class code, e.g. 0x030000 (VGA), 0x030200 (3D), 0x040300 (HD audio), 0x060400 (bridge). */
  classCode: number;
  /** NUMA node; undefined when the platform says -1 (or nothing). */
  numaNode: number | undefined;
  /** Bound driver, e.g. "nvidia", "vfio-pci"; undefined when none. */
  driver: string | undefined;
  /** driver_override; undefined when unset (sysfs shows "(null)"). */
  driverOverride: string | undefined;
  /** IOMMU group; undefined when the IOMMU is off. */
  iommuGroup: number | undefined;
}

export type MigMode = "not-supported" | "disabled" | "enabled";

/** What the vendor's tool (nvidia-smi) says about a GPU. */
export interface VendorGpuInfo {
  address: string;
  model: string;
  memoryTotalBytes: bigint;
  memoryUsedBytes: bigint;
  migMode: MigMode;
}

export type GpuState = "available" | "assigned" | "unavailable";

/** A GPU as the API shows it. */
export interface GpuView {
  address: string;
  vendorId: number;
  vendorName: string;
  deviceId: number;
  deviceName: string;
  model: string;
  numaNode: number | undefined;
  iommuGroup: number | undefined;
  /** The other devices of its IOMMU group. */
  iommuGroupDevices: string[];
  driver: string | undefined;
  originalDriver: string | undefined;
  memoryTotalBytes: bigint;
  memoryUsedBytes: bigint;
  migMode: MigMode;
  state: GpuState;
  stateMessage: string;
  /** `vms/{vm}` it is assigned to. */
  vm: string | undefined;
}

/** Drivers under which a device may share an IOMMU group with a passed-through one (VFIO's rule). */
export const VFIO_SAFE_DRIVERS = ["vfio-pci", "pci-stub"] as const;

const BDF = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/;

/** Whether `s` is a full PCI address in the kernel's spelling ("0000:41:00.0"). */
export function isPciAddress(s: string): boolean {
  return BDF.test(s);
}

/** PCI display controllers (class 0x03xxxx: VGA, XGA, 3D, other display) are GPUs. */
export function isGpu(f: PciFunction): boolean {
  return f.classCode >> 16 === 0x03;
}

/** `gpus/{address}` → address, or INVALID_ARGUMENT naming the field. */
export function gpuAddressFromName(name: string, field = "name"): string {
  const m = /^gpus\/(.+)$/.exec(name);
  const a = m?.[1]?.toLowerCase();
  if (!a || !isPciAddress(a)) {
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a GPU name (gpus/{pci address}, e.g. gpus/0000:41:00.0)`,
      "INVALID_GPU_NAME",
    );
  }
  return a;
}

export const gpuName = (address: string) => `gpus/${address}`;

export function gpuNotFound(address: string): VmenvError {
  return notFound("gpu", gpuName(address));
}

/** Two functions of one PCI device (same domain, bus and slot): a GPU and its audio function. */
export function sameSlot(a: string, b: string): boolean {
  return a.slice(0, -2) === b.slice(0, -2);
}

/**
 * Which devices of a GPU's IOMMU group must move to vfio-pci for the GPU to be passed through, or why
 * the group cannot go to a VM. Every device of a group goes to the VM together (the IOMMU cannot tell
 * them apart). Functions of the GPU itself (its HDMI audio) move along; any other device must already be
 * on vfio-pci or pci-stub, or have no driver, or the host would lose it (a bridge, a NIC).
 */
export function planGroup(
  gpu: PciFunction,
  group: readonly PciFunction[],
): { ok: true; bind: PciFunction[] } | { ok: false; error: VmenvError; message: string } {
  const name = gpuName(gpu.address);
  if (gpu.iommuGroup === undefined) {
    const message =
      "no IOMMU group: the IOMMU is off (turn on VT-d / AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on)";
    return {
      ok: false,
      message,
      error: new VmenvError("failed-precondition", `${name} cannot be passed through: ${message}`, {
        reason: "IOMMU_DISABLED",
        metadata: { gpu: name },
      }),
    };
  }
  const bind: PciFunction[] = [];
  for (const d of group) {
    const own = d.address === gpu.address || sameSlot(d.address, gpu.address);
    if (own) {
      if (d.driver !== "vfio-pci") bind.push(d);
      continue;
    }
    if (d.driver === undefined || (VFIO_SAFE_DRIVERS as readonly string[]).includes(d.driver)) {
      if (d.driver === undefined) bind.push(d);
      continue;
    }
    const message = `IOMMU group ${gpu.iommuGroup} also holds ${d.address} (class 0x${d.classCode.toString(16).padStart(6, "0")}), bound to the host driver ${d.driver}; it would go to the VM with the GPU`;
    return {
      ok: false,
      message,
      error: new VmenvError(
        "failed-precondition",
        `${name} cannot be passed through: ${message}. Unbind it (or bind it to vfio-pci) first, or move the GPU to a slot with its own IOMMU group (ACS)`,
        {
          reason: "IOMMU_GROUP_NOT_VIABLE",
          metadata: {
            gpu: name,
            device: d.address,
            driver: d.driver,
            iommu_group: String(gpu.iommuGroup),
          },
        },
      ),
    };
  }
  // The GPU's own functions first, function 0 first: the order the kernel and a reader expect.
  bind.sort((a, b) => a.address.localeCompare(b.address));
  return { ok: true, bind };
}
