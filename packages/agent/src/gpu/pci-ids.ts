import { readFile } from "node:fs/promises";

/**
 * Names of common GPU vendors and devices, spelled as the PCI id database (pci.ids) spells them, so a
 * host without `pci.ids` still names what it has. `pci.ids`, where present, names the rest.
 */
const VENDORS: Record<number, string> = {
  4318: "NVIDIA Corporation",
  4098: "Advanced Micro Devices, Inc. [AMD/ATI]",
  32902: "Intel Corporation",
  6900: "Red Hat, Inc.",
  4660: "Technical Corp.",
};

const DEVICES: Record<string, string> = {
  // NVIDIA datacenter
  "10de:2330": "GH100 [H100 SXM5 80GB]",
  "10de:2331": "GH100 [H100 PCIe]",
  "10de:2335": "GH100 [H200 SXM 141GB]",
  "10de:20b0": "GA100 [A100 SXM4 40GB]",
  "10de:20b2": "GA100 [A100 SXM4 80GB]",
  "10de:20b5": "GA100 [A100 PCIe 80GB]",
  "10de:20f1": "GA100 [A100 PCIe 40GB]",
  "10de:26b5": "AD102GL [L40]",
  "10de:26b9": "AD102GL [L40S]",
  "10de:27b8": "AD104GL [L4]",
  "10de:1eb8": "TU104GL [Tesla T4]",
  "10de:1db4": "GV100GL [Tesla V100 PCIe 16GB]",
  // NVIDIA consumer, with their HDMI audio functions
  "10de:2684": "AD102 [GeForce RTX 4090]",
  "10de:22ba": "AD102 High Definition Audio Controller",
  "10de:2704": "AD103 [GeForce RTX 4080]",
  "10de:22bb": "AD103 High Definition Audio Controller",
  "10de:2204": "GA102 [GeForce RTX 3090]",
  "10de:1aef": "GA102 High Definition Audio Controller",
  // AMD
  "1002:744c": "Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]",
  "1002:ab30": "Navi 31 HDMI/DP Audio",
  "1002:740f": "Aldebaran/MI200 [Instinct MI210]",
  "1002:74a1": "Aqua Vanjaram [Instinct MI300X]",
  // Intel
  "8086:a780": "Raptor Lake-S GT1 [UHD Graphics 770]",
  "8086:56a0": "DG2 [Arc A770]",
  "8086:0bd5": "Ponte Vecchio XT (1 Tile) [Data Center GPU Max 1100]",
  // Virtual
  "1234:1111": "QEMU Virtual Video Controller",
  "1af4:1050": "Virtio 1.0 GPU",
};

const hex4 = (n: number) => n.toString(16).padStart(4, "0");

/** Names PCI vendors and devices: the built-in table first, then `pci.ids` when a path is given. */
export class PciNames {
  #db: Promise<{ vendors: Map<number, string>; devices: Map<string, string> }> | undefined;

  constructor(private readonly pciIdsPath: string | undefined) {}

  async vendor(vendorId: number): Promise<string> {
    return VENDORS[vendorId] ?? (await this.#load()).vendors.get(vendorId) ?? "";
  }

  async device(vendorId: number, deviceId: number): Promise<string> {
    const key = `${hex4(vendorId)}:${hex4(deviceId)}`;
    return DEVICES[key] ?? (await this.#load()).devices.get(key) ?? "";
  }

  #load() {
    this.#db ??= (async () => {
      const vendors = new Map<number, string>();
      const devices = new Map<string, string>();
      if (!this.pciIdsPath) return { vendors, devices };
      const text = await readFile(this.pciIdsPath, "utf8").catch(() => "");
      let vendor: number | undefined;
      for (const line of text.split("\n")) {
        // "10de  NVIDIA Corporation" / "\t2330  GH100 [H100 SXM5 80GB]" / "\t\t…" (subsystems); the
        // device classes section ("C 03  Display controller") ends the vendors.
        if (line.startsWith("C ")) break;
        let m = /^([0-9a-f]{4}) {2}(.+)$/.exec(line);
        if (m?.[1] && m[2]) {
          vendor = Number.parseInt(m[1], 16);
          vendors.set(vendor, m[2]);
          continue;
        }
        m = /^\t([0-9a-f]{4}) {2}(.+)$/.exec(line);
        if (m?.[1] && m[2] && vendor !== undefined) devices.set(`${hex4(vendor)}:${m[1]}`, m[2]);
      }
      return { vendors, devices };
    })();
    return this.#db;
  }
}
