import { execa } from "execa";
import type { MigMode, VendorGpuInfo } from "./domain.js";

/** The fields asked of nvidia-smi, in this order. */
export const NVIDIA_SMI_FIELDS = [
  "pci.bus_id",
  "name",
  "memory.total",
  "memory.used",
  "mig.mode.current",
] as const;

export const NVIDIA_SMI_ARGS = [
  `--query-gpu=${NVIDIA_SMI_FIELDS.join(",")}`,
  "--format=csv,noheader,nounits",
];

const MIB = 1024n * 1024n;

/**
 * Parses `nvidia-smi --query-gpu=pci.bus_id,name,memory.total,memory.used,mig.mode.current
 * --format=csv,noheader,nounits`: one line per GPU, fields separated by ", ", memory in MiB, "[N/A]"
 * (or "[Not Supported]") where a GPU has no value. The bus id has an 8-digit domain ("00000000:41:00.0");
 * it is given back in sysfs's spelling ("0000:41:00.0").
 */
export function parseNvidiaSmi(text: string): VendorGpuInfo[] {
  const out: VendorGpuInfo[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const f = line.split(",").map((x) => x.trim());
    if (f.length < NVIDIA_SMI_FIELDS.length) continue;
    // A model name could hold a comma: the fixed fields are taken from both ends.
    const bus = f[0] ?? "";
    const [total, used, mig] = f.slice(-3);
    const model = f.slice(1, -3).join(", ");
    const m = /^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$/.exec(bus);
    if (!m?.[1]) continue;
    const address = `${m[1].slice(-4)}:${m[2]}:${m[3]}.${m[4]}`.toLowerCase();
    const mib = (s: string | undefined) => (s && /^\d+$/.test(s) ? BigInt(s) * MIB : 0n);
    const migMode: MigMode = /^enabled$/i.test(mig ?? "")
      ? "enabled"
      : /^disabled$/i.test(mig ?? "")
        ? "disabled"
        : "not-supported";
    out.push({ address, model, memoryTotalBytes: mib(total), memoryUsedBytes: mib(used), migMode });
  }
  return out;
}

/**
 * Asks nvidia-smi about the host's NVIDIA GPUs. A host without nvidia-smi (or without the NVIDIA driver
 * loaded) has nothing to say: undefined, not an error.
 */
export async function queryNvidiaSmi(
  binary: string,
  timeoutMs = 10_000,
): Promise<VendorGpuInfo[] | undefined> {
  const r = await execa(binary, NVIDIA_SMI_ARGS, { reject: false, timeout: timeoutMs, stdin: "ignore" });
  if (r.failed || r.exitCode !== 0) return undefined;
  return parseNvidiaSmi(r.stdout);
}
