/**
 * GPU fixture trees: a `/sys` as the Linux kernel lays it out for PCI devices, drivers and IOMMU groups
 * (Documentation/ABI/testing/sysfs-bus-pci, sysfs-kernel-iommu_groups; drivers/pci/pci-sysfs.c). They are
 * made from those documented layouts, not recorded on a machine with these GPUs (none was at hand);
 * README.md beside this file says what each one models.
 *
 * Also a fake "kernel" that reacts to the writes an agent makes (unbind, driver_override, drivers_probe,
 * bind) the way the PCI core does, by moving the `driver` symlinks: called after each write (unit tests)
 * or watching the tree's files (integration tests, where the agent runs in another process).
 */
import { type FSWatcher, watch } from "node:fs";
import { mkdir, readFile, readlink, rm, symlink, unlink, writeFile } from "node:fs/promises";
import { dirname, join, relative } from "node:path";

export interface FixtureDevice {
  address: string;
  vendor: number;
  device: number;
  classCode: number;
  /** -1 when the platform does not say. */
  numaNode: number;
  driver: string | undefined;
  /** undefined on a host without IOMMU. */
  iommuGroup: number | undefined;
  /** Address of the upstream bridge (the device sits below it in /sys/devices), if any. */
  parent?: string;
}

export type FixtureKind = "h100" | "rtx4090" | "rtx4090-shared-group" | "no-iommu" | "no-gpu";

const hex = (n: number, w: number) => `0x${n.toString(16).padStart(w, "0")}`;

/** The devices of each fixture host. */
export function fixtureDevices(kind: FixtureKind): FixtureDevice[] {
  const rootPort = (address: string, group: number | undefined): FixtureDevice => ({
    address,
    vendor: 0x8086,
    device: 0x09ab,
    classCode: 0x060400,
    numaNode: -1,
    driver: "pcieport",
    iommuGroup: group,
  });
  switch (kind) {
    // (a) A datacenter GPU: H100 SXM5 behind a root port on NUMA node 1, alone in IOMMU group 17, on the
    // NVIDIA driver; host bridge and root port in their own groups.
    case "h100":
      return [
        { ...rootPort("0000:00:00.0", 0), device: 0x09a2, classCode: 0x060000, driver: undefined },
        { ...rootPort("0000:00:01.0", 16), numaNode: 1 },
        {
          address: "0000:01:00.0",
          vendor: 0x10de,
          device: 0x2330,
          classCode: 0x030200,
          numaNode: 1,
          driver: "nvidia",
          iommuGroup: 17,
          parent: "0000:00:01.0",
        },
      ];
    // (b) A workstation: RTX 4090 with its HDMI audio function in one IOMMU group (12), plus the CPU's
    // integrated graphics alone in group 0.
    case "rtx4090":
      return [
        {
          address: "0000:00:02.0",
          vendor: 0x8086,
          device: 0xa780,
          classCode: 0x030000,
          numaNode: -1,
          driver: "i915",
          iommuGroup: 0,
        },
        rootPort("0000:00:01.0", 1),
        ...rtx4090(12),
      ];
    // (b') The same card in a slot without ACS: its root port shares IOMMU group 12 with it.
    case "rtx4090-shared-group":
      return [rootPort("0000:00:01.0", 12), ...rtx4090(12)];
    // (c) IOMMU off: an AMD Radeon RX 7900 XTX on amdgpu, no iommu_group links, no groups.
    case "no-iommu":
      return [
        rootPort("0000:00:01.1", undefined),
        {
          address: "0000:03:00.0",
          vendor: 0x1002,
          device: 0x744c,
          classCode: 0x030000,
          numaNode: -1,
          driver: "amdgpu",
          iommuGroup: undefined,
          parent: "0000:00:01.1",
        },
        {
          address: "0000:03:00.1",
          vendor: 0x1002,
          device: 0xab30,
          classCode: 0x040300,
          numaNode: -1,
          driver: "snd_hda_intel",
          iommuGroup: undefined,
          parent: "0000:00:01.1",
        },
      ];
    // A server without display controllers: a host bridge and a NIC.
    case "no-gpu":
      return [
        { ...rootPort("0000:00:00.0", 0), classCode: 0x060000, driver: undefined },
        {
          address: "0000:00:19.0",
          vendor: 0x8086,
          device: 0x15b8,
          classCode: 0x020000,
          numaNode: -1,
          driver: "e1000e",
          iommuGroup: 5,
        },
      ];
  }
}

function rtx4090(group: number): FixtureDevice[] {
  const base = { vendor: 0x10de, numaNode: -1, iommuGroup: group, parent: "0000:00:01.0" };
  return [
    { ...base, address: "0000:01:00.0", device: 0x2684, classCode: 0x030000, driver: "nvidia" },
    { ...base, address: "0000:01:00.1", device: 0x22ba, classCode: 0x040300, driver: "snd_hda_intel" },
  ];
}

/** Path of a device below /sys/devices (bridges first: pci0000:00/0000:00:01.0/0000:01:00.0). */
function devicePath(devs: FixtureDevice[], d: FixtureDevice): string {
  const chain: string[] = [];
  for (let x: FixtureDevice | undefined = d; x; x = devs.find((p) => p.address === x?.parent))
    chain.unshift(x.address);
  return join("devices", `pci${d.address.slice(0, 7)}`, ...chain);
}

const DRIVERS = ["nvidia", "snd_hda_intel", "i915", "amdgpu", "pcieport", "e1000e", "vfio-pci", "pci-stub"];

/** Writes the tree of `kind` under `root` (its `/sys`). */
export async function buildFixture(kind: FixtureKind, root: string): Promise<void> {
  const devs = fixtureDevices(kind);
  const rel = async (from: string, to: string) => {
    await mkdir(dirname(join(root, from)), { recursive: true });
    await symlink(relative(dirname(join(root, from)), join(root, to)), join(root, from));
  };
  await mkdir(join(root, "bus/pci/devices"), { recursive: true });
  await mkdir(join(root, "kernel/iommu_groups"), { recursive: true });
  // drivers_probe and each driver's bind/unbind are write-only attributes; here, empty files.
  await writeFile(join(root, "bus/pci/drivers_probe"), "");
  for (const drv of DRIVERS) {
    await mkdir(join(root, "bus/pci/drivers", drv), { recursive: true });
    for (const f of ["bind", "unbind", "new_id", "remove_id"])
      await writeFile(join(root, "bus/pci/drivers", drv, f), "");
  }
  for (const d of devs) {
    const dir = devicePath(devs, d);
    await mkdir(join(root, dir), { recursive: true });
    const files: Record<string, string> = {
      vendor: hex(d.vendor, 4),
      device: hex(d.device, 4),
      class: hex(d.classCode, 6),
      numa_node: String(d.numaNode),
      driver_override: "(null)",
      enable: "1",
    };
    for (const [f, v] of Object.entries(files)) await writeFile(join(root, dir, f), `${v}\n`);
    await rel(join("bus/pci/devices", d.address), dir);
    if (d.driver) {
      await rel(join(dir, "driver"), join("bus/pci/drivers", d.driver));
      await rel(join("bus/pci/drivers", d.driver, d.address), dir);
    }
    if (d.iommuGroup !== undefined) {
      const g = join("kernel/iommu_groups", String(d.iommuGroup));
      await mkdir(join(root, g, "devices"), { recursive: true });
      await writeFile(join(root, g, "type"), "DMA-FQ\n");
      await rel(join(dir, "iommu_group"), g);
      await rel(join(g, "devices", d.address), dir);
    }
  }
}

/** A write the agent made, as the kernel received it. */
export interface SysfsWrite {
  path: string;
  data: string;
}

/**
 * Emulates the PCI core's reaction to the agent's writes in a fixture tree. `native` is the driver each
 * device's ids match (what drivers_probe binds when driver_override is empty).
 */
export class FakeKernel {
  readonly writes: SysfsWrite[] = [];
  #watchers: FSWatcher[] = [];

  constructor(
    readonly root: string,
    private readonly native: Record<string, string | undefined>,
    /** Drivers that refuse to bind (a vfio-pci module that is not loaded). */
    private readonly broken: string[] = [],
  ) {}

  static for(kind: FixtureKind, root: string, broken: string[] = []): FakeKernel {
    return new FakeKernel(
      root,
      Object.fromEntries(fixtureDevices(kind).map((d) => [d.address, d.driver])),
      broken,
    );
  }

  /** What the kernel does for one write. */
  async react(path: string, data: string): Promise<void> {
    this.writes.push({ path, data });
    const bdf = data.trim();
    let m = /^bus\/pci\/drivers\/([^/]+)\/(unbind|bind)$/.exec(path);
    if (m?.[1]) {
      if (m[2] === "unbind" && (await this.driverOf(bdf)) === m[1]) await this.#setDriver(bdf, undefined);
      if (m[2] === "bind" && (await this.driverOf(bdf)) === undefined) await this.#setDriver(bdf, m[1]);
      return;
    }
    if (path === "bus/pci/drivers_probe" && (await this.driverOf(bdf)) === undefined) {
      const override = (
        await readFile(join(this.root, "bus/pci/devices", bdf, "driver_override"), "utf8")
      ).trim();
      const want = override && override !== "(null)" ? override : this.native[bdf];
      if (want) await this.#setDriver(bdf, want);
      return;
    }
    m = /^bus\/pci\/devices\/([^/]+)\/driver_override$/.exec(path);
    // The kernel shows an empty override as "(null)".
    if (m?.[1] && data.trim() === "") await writeFile(join(this.root, path), "(null)\n");
  }

  async driverOf(bdf: string): Promise<string | undefined> {
    return readlink(join(this.root, "bus/pci/devices", bdf, "driver")).then(
      (t) => t.split("/").pop(),
      () => undefined,
    );
  }

  async #setDriver(bdf: string, driver: string | undefined): Promise<void> {
    if (driver && this.broken.includes(driver)) return;
    const dev = join(this.root, "bus/pci/devices", bdf);
    const old = await this.driverOf(bdf);
    if (old) {
      await unlink(join(dev, "driver"));
      await rm(join(this.root, "bus/pci/drivers", old, bdf), { force: true });
    }
    if (driver) {
      const real = await readlink(dev);
      const devDir = join(this.root, "bus/pci/devices", real);
      await symlink(relative(devDir, join(this.root, "bus/pci/drivers", driver)), join(devDir, "driver"));
      await symlink(
        relative(join(this.root, "bus/pci/drivers", driver), devDir),
        join(this.root, "bus/pci/drivers", driver, bdf),
      );
    }
  }

  /** Reacts to writes made by another process: watches drivers_probe and every bind/unbind file. */
  watch(): void {
    const files = [
      "bus/pci/drivers_probe",
      ...DRIVERS.flatMap((d) => [`bus/pci/drivers/${d}/bind`, `bus/pci/drivers/${d}/unbind`]),
    ];
    let chain = Promise.resolve();
    for (const f of files) {
      const w = watch(join(this.root, f), () => {
        chain = chain
          .then(async () => {
            const data = await readFile(join(this.root, f), "utf8");
            if (data.trim()) await this.react(f, data);
          })
          .catch(() => undefined);
      });
      this.#watchers.push(w);
    }
  }

  close(): void {
    for (const w of this.#watchers) w.close();
    this.#watchers = [];
  }
}
