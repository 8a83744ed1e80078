import { describe, expect, it } from "vitest";
import type { LaunchRequest } from "../vmm/driver.js";
import { hotplugGpu, qemuArgs } from "../vmm/qemu/cmdline.js";
import { parseNvidiaSmi } from "./nvidia-smi.js";

const MIB = 1024n * 1024n;

function request(gpus: LaunchRequest["gpus"]): LaunchRequest {
  const dir = "/var/lib/vmenv/vms/train";
  return {
    id: "train",
    spec: {
      vmm: "qemu",
      accelerator: "kvm",
      vcpus: 2,
      maxVcpus: 2,
      memoryBytes: 512n * MIB,
      maxMemoryBytes: 512n * MIB,
      hostCpus: [],
      boot: { kind: "kernel", kernelPath: "/k", initrdPath: undefined, cmdline: "console=ttyS0" },
    },
    accelerator: "kvm",
    paths: {
      dir,
      record: `${dir}/vm.json`,
      control: `${dir}/qmp.sock`,
      serialSocket: `${dir}/serial.sock`,
      serialLog: `${dir}/serial.log`,
      pidFile: `${dir}/vmm.pid`,
    },
    paused: false,
    disks: [],
    nics: [],
    ...(gpus ? { gpus } : {}),
  };
}

const devices = (args: string[]) => args.flatMap((a, i) => (args[i - 1] === "-device" ? [a] : []));

describe("QEMU command line of a passed-through GPU", () => {
  it("a datacenter GPU alone: one vfio-pci device behind its root port", () => {
    const d = devices(qemuArgs(request([{ id: "gpu0", host: "0000:01:00.0", functions: [], slot: 3 }])));
    expect(d.filter((x) => x.startsWith("vfio-pci"))).toEqual([
      "vfio-pci,host=0000:01:00.0,id=gpu-gpu0,bus=rp3,addr=00.0",
    ]);
    // Behind one of the VM's PCIe root ports.
    expect(d).toContain("pcie-root-port,id=rp3,chassis=4,bus=pcie.0,addr=13");
  });

  it("a consumer GPU with its audio: one multi-function device in the guest, as on the host", () => {
    const d = devices(
      qemuArgs(request([{ id: "gpu0", host: "0000:41:00.0", functions: ["0000:41:00.1"], slot: 0 }])),
    );
    expect(d.filter((x) => x.startsWith("vfio-pci"))).toEqual([
      "vfio-pci,host=0000:41:00.1,id=gpu-gpu0-f1,bus=rp0,addr=00.1",
      "vfio-pci,host=0000:41:00.0,id=gpu-gpu0,bus=rp0,addr=00.0,multifunction=on",
    ]);
  });

  it("no GPUs, no vfio-pci", () => {
    expect(qemuArgs(request(undefined)).some((a) => a.includes("vfio-pci"))).toBe(false);
  });
});

describe("GPU hot-plug over QMP", () => {
  it("adds the other functions first and function 0 last", async () => {
    const sent: [string, Record<string, unknown>][] = [];
    await hotplugGpu(
      async (c, a) => {
        sent.push([c, a]);
        return {};
      },
      { id: "gpu0", host: "0000:41:00.0", functions: ["0000:41:00.1"], slot: 5 },
    );
    expect(sent).toEqual([
      [
        "device_add",
        { driver: "vfio-pci", host: "0000:41:00.1", id: "gpu-gpu0-f1", bus: "rp5", addr: "00.1" },
      ],
      [
        "device_add",
        {
          driver: "vfio-pci",
          host: "0000:41:00.0",
          id: "gpu-gpu0",
          bus: "rp5",
          addr: "00.0",
          multifunction: "on",
        },
      ],
    ]);
  });

  it("when function 0 fails, the functions already added are deleted: nothing stays", async () => {
    const sent: string[] = [];
    const err = await hotplugGpu(
      async (c, a) => {
        sent.push(`${c} ${a.id}`);
        if (c === "device_add" && a.id === "gpu-gpu0")
          throw new Error("vfio 0000:41:00.0: group 12 is not viable");
        return {};
      },
      { id: "gpu0", host: "0000:41:00.0", functions: ["0000:41:00.1"], slot: 5 },
    ).catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(Error);
    expect(sent).toEqual(["device_add gpu-gpu0-f1", "device_add gpu-gpu0", "device_del gpu-gpu0-f1"]);
  });
});

describe("nvidia-smi output", () => {
  it("parses the documented CSV: bus id in sysfs spelling, MiB to bytes, MIG mode, [N/A]", () => {
    const text = [
      "00000000:01:00.0, NVIDIA H100 80GB HBM3, 81559, 4, Enabled",
      "00000000:41:00.0, NVIDIA GeForce RTX 4090, 24564, 1021, [N/A]",
      "",
    ].join("\n");
    expect(parseNvidiaSmi(text)).toEqual([
      {
        address: "0000:01:00.0",
        model: "NVIDIA H100 80GB HBM3",
        memoryTotalBytes: 81559n * MIB,
        memoryUsedBytes: 4n * MIB,
        migMode: "enabled",
      },
      {
        address: "0000:41:00.0",
        model: "NVIDIA GeForce RTX 4090",
        memoryTotalBytes: 24564n * MIB,
        memoryUsedBytes: 1021n * MIB,
        migMode: "not-supported",
      },
    ]);
  });
});
