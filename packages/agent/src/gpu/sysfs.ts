import { readdir, readFile, readlink, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { isPciAddress, type PciFunction } from "./domain.js";

/**
 * The PCI bus as sysfs shows it (`<root>/bus/pci/devices/<address>` → `<root>/devices/pci…/…`), and the
 * writes that move a device between drivers. `root` is "/sys" on a host and a fixture tree in tests.
 */
export class SysfsPci {
  constructor(
    readonly root: string,
    /** Called after every write, with the path relative to `root` (tests emulate the kernel here). */
    private readonly onWrite?: (path: string, data: string) => void | Promise<void>,
  ) {}

  /** Every PCI function, in address order. A tree without a PCI bus has none. */
  async functions(): Promise<PciFunction[]> {
    const names = await readdir(join(this.root, "bus/pci/devices")).catch(() => [] as string[]);
    const out: PciFunction[] = [];
    for (const a of names.filter(isPciAddress).sort()) {
      const f = await this.function(a);
      if (f) out.push(f);
    }
    return out;
  }

  /** One function, read afresh; undefined when it is gone. */
  async function(address: string): Promise<PciFunction | undefined> {
    if (!isPciAddress(address)) return undefined;
    const dir = join(this.root, "bus/pci/devices", address);
    const read = (f: string) =>
      readFile(join(dir, f), "utf8").then(
        (s) => s.trim(),
        () => undefined,
      );
    const [vendor, device, cls, numa, override] = await Promise.all(
      ["vendor", "device", "class", "numa_node", "driver_override"].map(read),
    );
    if (vendor === undefined || device === undefined || cls === undefined) return undefined;
    const link = (f: string) =>
      readlink(join(dir, f)).then(
        (t) => basename(t),
        () => undefined,
      );
    const [driver, group] = await Promise.all([link("driver"), link("iommu_group")]);
    const node = numa === undefined ? -1 : Number(numa);
    return {
      address,
      vendorId: Number.parseInt(vendor, 16),
      deviceId: Number.parseInt(device, 16),
      classCode: Number.parseInt(cls, 16),
      numaNode: Number.isInteger(node) && node >= 0 ? node : undefined,
      driver,
      driverOverride:
        override === undefined || override === "(null)" || override === "" ? undefined : override,
      iommuGroup: group === undefined || !/^\d+$/.test(group) ? undefined : Number(group),
    };
  }

  /** Whether the IOMMU is on: the kernel then lists groups under /sys/kernel/iommu_groups. */
  async iommuEnabled(): Promise<boolean> {
    const groups = await readdir(join(this.root, "kernel/iommu_groups")).catch(() => [] as string[]);
    return groups.length > 0;
  }

  /** The addresses in an IOMMU group, sorted. */
  async group(n: number): Promise<string[]> {
    const names = await readdir(join(this.root, "kernel/iommu_groups", String(n), "devices")).catch(
      () => [] as string[],
    );
    return names.filter(isPciAddress).sort();
  }

  /** Detaches a device from its driver (`drivers/<driver>/unbind`). */
  unbind(address: string, driver: string): Promise<void> {
    return this.#write(`bus/pci/drivers/${checkDriver(driver)}/unbind`, address);
  }

  /** Sets driver_override ("vfio-pci"), or clears it (undefined: the kernel takes "\n" as "none"). */
  setOverride(address: string, driver: string | undefined): Promise<void> {
    return this.#write(
      `bus/pci/devices/${checkAddress(address)}/driver_override`,
      driver === undefined ? "\n" : checkDriver(driver),
    );
  }

  /** Asks the kernel to find a driver for an unbound device (honouring driver_override). */
  probe(address: string): Promise<void> {
    return this.#write("bus/pci/drivers_probe", checkAddress(address));
  }

  /** Binds a device to a named driver (`drivers/<driver>/bind`). */
  bind(address: string, driver: string): Promise<void> {
    return this.#write(`bus/pci/drivers/${checkDriver(driver)}/bind`, checkAddress(address));
  }

  async #write(path: string, data: string): Promise<void> {
    // sysfs attributes take one write; "w" truncates nothing there, and in a fixture it leaves exactly
    // the last value written.
    await writeFile(join(this.root, path), data);
    await this.onWrite?.(path, data);
  }
}

function checkAddress(a: string): string {
  if (!isPciAddress(a)) throw new Error(`not a PCI address: ${a}`);
  return a;
}

function checkDriver(d: string): string {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(d) || d === "." || d === "..")
    throw new Error(`not a driver name: ${d}`);
  return d;
}
