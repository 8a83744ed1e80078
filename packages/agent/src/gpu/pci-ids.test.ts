import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { PciNames } from "./pci-ids.js";

describe("PCI names", () => {
  it("names common GPUs without pci.ids, and the rest from pci.ids when there is one", async () => {
    const dir = await mkdtemp(join(tmpdir(), "vmenv-pciids-"));
    try {
      const file = join(dir, "pci.ids");
      await writeFile(
        file,
        [
          "# comment",
          "10de  NVIDIA Corporation",
          "\t2330  GH100 [H100 SXM5 80GB] (from the file)",
          "\t2901  GB200 [B200]",
          "\t\t10de 1999  a subsystem",
          "abcd  Example Vendor",
          "\t0001  Example Device",
          "C 03  Display controller",
          "\t00  VGA compatible controller",
        ].join("\n"),
      );
      const names = new PciNames(file);
      expect(await names.device(0x10de, 0x2330)).toBe("GH100 [H100 SXM5 80GB]"); // built-in first
      expect(await names.device(0x10de, 0x2901)).toBe("GB200 [B200]");
      expect(await names.vendor(0xabcd)).toBe("Example Vendor");
      expect(await names.device(0xabcd, 0x0001)).toBe("Example Device");
      expect(await names.device(0xabcd, 0x0002)).toBe("");
      const none = new PciNames(join(dir, "missing"));
      expect(await none.vendor(0x1002)).toBe("Advanced Micro Devices, Inc. [AMD/ATI]");
      expect(await none.vendor(0xabcd)).toBe("");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
