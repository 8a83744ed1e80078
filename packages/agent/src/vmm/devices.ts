/**
 * Device change sets (seed 002): each element joins (declares), binds (attaches), unbinds (detaches) or
 * leaves (removes) a device. Planning is pure: from the VM's devices and one element, what to do.
 */
import { alreadyExists, invalidArgument, notFound, type VmenvError } from "@vmenv/rpc/errors";

export interface DiskDevice {
  kind: "disk";
  id: string;
  /** `volumes/{volume}`. */
  volume: string;
  readOnly: boolean;
  serial: string;
}

export interface NicDevice {
  kind: "nic";
  id: string;
  /** `networks/{network}`. */
  network: string;
  /** Wanted MAC and IP; empty = derived / allocated by the network service. */
  mac: string;
  ip: string;
}

/** A GPU passed through (vfio-pci); it must be assigned to the VM first (GpuService.AssignGpu). */
export interface GpuDevice {
  kind: "gpu";
  id: string;
  /** `gpus/{pci address}`. */
  gpu: string;
}

export type Device = DiskDevice | NicDevice | GpuDevice;

/** Where a NIC is plugged on the host (its port on the network). */
export interface NicPlug {
  port: string;
  tap: string;
  mac: string;
  ip: string;
  prefix: number;
  gateway: string | undefined;
}

export interface DeviceState {
  device: Device;
  /** Attached to the running VMM, or to be attached at the next start. */
  bound: boolean;
  /** PCIe root port the device sits behind while attached (QEMU), e.g. 2 for `rp2`. */
  slot: number | undefined;
  /** For a NIC: its port, once joined (the port is reserved at JOIN, released at LEAVE). */
  plug?: NicPlug;
}

export type ChangeAction = "join" | "bind" | "unbind" | "leave";

export interface Change {
  action: ChangeAction;
  deviceId: string;
  /** The whole device (required for join; enough alone for the others). */
  device: Device | undefined;
}

export type Step =
  | { kind: "noop" }
  | { kind: "join"; device: Device }
  | { kind: "bind"; device: Device; join: boolean }
  | { kind: "unbind"; device: Device }
  | { kind: "leave"; device: Device; unbind: boolean }
  | { kind: "error"; error: VmenvError };

const same = (a: Device, b: Device) => JSON.stringify(a) === JSON.stringify(b);

/** What one element means for the VM's current devices. */
export function plan(vm: string, devices: readonly DeviceState[], c: Change): Step {
  const cur = devices.find((d) => d.device.id === c.deviceId);
  const err = (error: VmenvError): Step => ({ kind: "error", error });
  if (c.device && cur && !same(cur.device, c.device) && (c.action === "join" || c.action === "bind")) {
    return err(alreadyExists("device", `${vm}/devices/${c.deviceId}`, "with a different definition"));
  }
  switch (c.action) {
    case "join":
      if (!c.device)
        return err(invalidArgument("changes.device", "JOIN needs the whole device, not only its id"));
      return cur ? { kind: "noop" } : { kind: "join", device: c.device };
    case "bind":
      if (cur) return cur.bound ? { kind: "noop" } : { kind: "bind", device: cur.device, join: false };
      if (!c.device) return err(notFound("device", `${vm}/devices/${c.deviceId}`));
      return { kind: "bind", device: c.device, join: true };
    case "unbind":
      if (!cur) return err(notFound("device", `${vm}/devices/${c.deviceId}`));
      return cur.bound ? { kind: "unbind", device: cur.device } : { kind: "noop" };
    case "leave":
      return cur ? { kind: "leave", device: cur.device, unbind: cur.bound } : { kind: "noop" };
  }
}

/** Device ids follow the VM id rules: they name QEMU objects and files. */
export function checkDeviceId(id: string, field: string): void {
  if (!/^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$/.test(id)) {
    throw invalidArgument(
      field,
      `"${id.slice(0, 40)}" is not a valid device id: 1-32 lower-case letters, digits and hyphens, starting with a letter`,
    );
  }
}

/** The lowest PCIe root port no other attached device uses. */
export function freeSlot(devices: readonly DeviceState[], slots: number): number | undefined {
  const used = new Set(devices.filter((d) => d.slot !== undefined).map((d) => d.slot));
  for (let i = 0; i < slots; i++) if (!used.has(i)) return i;
  return undefined;
}
