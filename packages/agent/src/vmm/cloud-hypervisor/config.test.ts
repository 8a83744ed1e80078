import { describe, expect, it } from "vitest";
import {
  buildDiskConfig,
  buildNetConfig,
  buildResize,
  buildVmConfig,
  ChConfigError,
  type ChLaunchSpec,
} from "./config.js";
import { loadChOpenApi } from "./testing/openapi.js";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

const openApi = loadChOpenApi();

/** Both modes: what the document says, and the same with undeclared fields rejected. */
function expectValid(schema: string, body: unknown): void {
  expect(openApi.validate(schema, body, "published")).toEqual([]);
  expect(openApi.validate(schema, body, "closed")).toEqual([]);
}

function kernelSpec(over: Partial<ChLaunchSpec> = {}): ChLaunchSpec {
  return {
    id: "web-1",
    vcpus: 2,
    maxVcpus: 4,
    memoryBytes: GiB,
    maxMemoryBytes: 4 * GiB,
    boot: {
      kind: "kernel",
      kernel: "/var/lib/vmenv/images/vmlinux",
      initrd: "/var/lib/vmenv/images/initrd.img",
      cmdline: "console=ttyS0 root=/dev/vda rw",
    },
    disks: [
      { id: "root", path: "/var/lib/vmenv/volumes/root.raw", format: "raw" },
      { id: "seed", path: "/var/lib/vmenv/volumes/seed.img", readOnly: true, serial: "seed-0001" },
    ],
    nics: [{ id: "eth0", tap: "vmenv-t1a2b3", mac: "52:54:00:AB:CD:01" }],
    serial: { kind: "file", path: "/run/vmenv/vms/web-1/serial.log" },
    ...over,
  };
}

function errorOf(f: () => unknown): ChConfigError {
  try {
    f();
  } catch (err) {
    if (err instanceof ChConfigError) return err;
    throw err;
  }
  throw new Error("expected a ChConfigError");
}

describe("buildVmConfig", () => {
  it("turns a kernel-boot spec with two disks, a NIC and hotplug room into the vm.create body", () => {
    const body = buildVmConfig(kernelSpec());
    expect(body).toEqual({
      cpus: { boot_vcpus: 2, max_vcpus: 4 },
      memory: { size: GiB, hotplug_size: 3 * GiB },
      payload: {
        kernel: "/var/lib/vmenv/images/vmlinux",
        initramfs: "/var/lib/vmenv/images/initrd.img",
        cmdline: "console=ttyS0 root=/dev/vda rw",
      },
      disks: [
        { id: "root", path: "/var/lib/vmenv/volumes/root.raw", readonly: false, image_type: "Raw" },
        { id: "seed", path: "/var/lib/vmenv/volumes/seed.img", readonly: true, serial: "seed-0001" },
      ],
      net: [{ id: "eth0", tap: "vmenv-t1a2b3", mac: "52:54:00:ab:cd:01" }],
      serial: { mode: "File", file: "/run/vmenv/vms/web-1/serial.log" },
      console: { mode: "Off" },
    });
    expectValid("VmConfig", body);
  });

  it("leaves hotplug out when there is no room, and accepts bigint sizes", () => {
    const body = buildVmConfig(
      kernelSpec({ maxVcpus: undefined, memoryBytes: 2n * BigInt(GiB), maxMemoryBytes: undefined }),
    );
    expect(body.cpus).toEqual({ boot_vcpus: 2, max_vcpus: 2 });
    expect(body.memory).toEqual({ size: 2 * GiB });
    expectValid("VmConfig", body);
  });

  it("builds firmware boot, a pty, VFIO GPUs, pinning, huge pages and a vhost-user disk (shared memory)", () => {
    const body = buildVmConfig({
      id: "train-7",
      vcpus: 4,
      memoryBytes: 8 * GiB,
      hugepages: { pageSizeBytes: 2 * MiB },
      boot: { kind: "firmware", firmware: "/usr/share/cloud-hypervisor/CLOUDHV.fd" },
      disks: [{ id: "data", vhostUserSocket: "/run/vmenv/volumes/data/vhost.sock" }],
      serial: { kind: "pty" },
      cpuAffinity: [
        { vcpu: 0, hostCpus: [2] },
        { vcpu: 1, hostCpus: [3, 4] },
      ],
      gpus: [{ id: "gpu0", sysfsPath: "/sys/bus/pci/devices/0000:41:00.0" }],
    });
    expect(body).toEqual({
      cpus: {
        boot_vcpus: 4,
        max_vcpus: 4,
        affinity: [
          { vcpu: 0, host_cpus: [2] },
          { vcpu: 1, host_cpus: [3, 4] },
        ],
      },
      memory: { size: 8 * GiB, shared: true, hugepages: true, hugepage_size: 2 * MiB },
      payload: { firmware: "/usr/share/cloud-hypervisor/CLOUDHV.fd" },
      disks: [
        { id: "data", vhost_user: true, vhost_socket: "/run/vmenv/volumes/data/vhost.sock", readonly: false },
      ],
      devices: [{ id: "gpu0", path: "/sys/bus/pci/devices/0000:41:00.0" }],
      serial: { mode: "Pty" },
      console: { mode: "Off" },
    });
    expectValid("VmConfig", body);
  });

  it("puts guest NUMA nodes into memory zones with a zero top-level size", () => {
    const body = buildVmConfig(
      kernelSpec({
        vcpus: 4,
        maxVcpus: 4,
        memoryBytes: 4 * GiB,
        maxMemoryBytes: undefined,
        sharedMemory: true,
        hugepages: true,
        numaNodes: [
          { guestNode: 0, vcpus: [0, 1], memoryBytes: 3 * GiB, hostNode: 1 },
          { guestNode: 1, vcpus: [2, 3], memoryBytes: GiB },
        ],
      }),
    );
    expect(body.memory).toEqual({
      size: 0,
      zones: [
        { id: "mem0", size: 3 * GiB, host_numa_node: 1, shared: true, hugepages: true },
        { id: "mem1", size: GiB, shared: true, hugepages: true },
      ],
    });
    expect(body.numa).toEqual([
      { guest_numa_id: 0, cpus: [0, 1], memory_zones: ["mem0"] },
      { guest_numa_id: 1, cpus: [2, 3], memory_zones: ["mem1"] },
    ]);
    expectValid("VmConfig", body);
  });

  it("serial to a socket, or off", () => {
    expect(buildVmConfig(kernelSpec({ serial: { kind: "socket", path: "/run/s.sock" } })).serial).toEqual({
      mode: "Socket",
      socket: "/run/s.sock",
    });
    const off = buildVmConfig(kernelSpec({ serial: { kind: "off" } }));
    expect(off.serial).toEqual({ mode: "Off" });
    expectValid("VmConfig", off);
  });

  it.each<[string, Partial<ChLaunchSpec>, string]>([
    ["fewer max vCPUs than boot vCPUs", { vcpus: 4, maxVcpus: 2 }, "maxVcpus"],
    ["zero vCPUs", { vcpus: 0 }, "vcpus"],
    ["less max memory than memory", { maxMemoryBytes: GiB / 2 }, "maxMemoryBytes"],
    ["memory not in whole pages", { memoryBytes: GiB + 1 }, "memoryBytes"],
    ["memory beyond a safe integer", { memoryBytes: 2n ** 60n + 1n }, "memoryBytes"],
    [
      "memory not in whole huge pages",
      { memoryBytes: GiB + 4096, maxMemoryBytes: undefined, hugepages: { pageSizeBytes: 2 * MiB } },
      "hugepages.pageSizeBytes",
    ],
    ["an empty kernel path", { boot: { kind: "kernel", kernel: "", cmdline: "" } }, "boot.kernel"],
    [
      "one id for a disk and a NIC",
      { nics: [{ id: "root", tap: "tap0", mac: "52:54:00:00:00:01" }] },
      "nics[0].id",
    ],
    ["a disk with neither path nor socket", { disks: [{ id: "d" }] }, "disks[0]"],
    [
      "a disk with both path and socket",
      { disks: [{ id: "d", path: "/a", vhostUserSocket: "/b" }] },
      "disks[0]",
    ],
    ["an id the VMM reserves", { disks: [{ id: "_disk0", path: "/a" }] }, "disks[0].id"],
    ["a malformed MAC", { nics: [{ id: "n", tap: "tap0", mac: "52:54:00:00:01" }] }, "nics[0].mac"],
    ["a multicast MAC", { nics: [{ id: "n", tap: "tap0", mac: "01:00:5e:00:00:01" }] }, "nics[0].mac"],
    [
      "a tap name over 15 bytes",
      { nics: [{ id: "n", tap: "vmenv-tap-0123456", mac: "52:54:00:00:00:01" }] },
      "nics[0].tap",
    ],
    [
      "pinning a vCPU that does not exist",
      { cpuAffinity: [{ vcpu: 4, hostCpus: [0] }] },
      "cpuAffinity[0].vcpu",
    ],
    ["pinning to no host CPU", { cpuAffinity: [{ vcpu: 0, hostCpus: [] }] }, "cpuAffinity[0].hostCpus"],
    ["a relative sysfs path", { gpus: [{ id: "g", sysfsPath: "0000:41:00.0" }] }, "gpus[0].sysfsPath"],
    [
      "NUMA nodes that do not add up",
      { maxMemoryBytes: undefined, numaNodes: [{ guestNode: 0, vcpus: [0], memoryBytes: GiB / 2 }] },
      "numaNodes",
    ],
    [
      "NUMA nodes with hotplug room",
      { numaNodes: [{ guestNode: 0, vcpus: [0], memoryBytes: GiB }] },
      "maxMemoryBytes",
    ],
    [
      "a vCPU in two NUMA nodes",
      {
        maxMemoryBytes: undefined,
        numaNodes: [
          { guestNode: 0, vcpus: [0, 1], memoryBytes: GiB / 2 },
          { guestNode: 1, vcpus: [1], memoryBytes: GiB / 2 },
        ],
      },
      "numaNodes[1].vcpus[0]",
    ],
  ])("refuses %s, naming the field", (_, over, field) => {
    const err = errorOf(() => buildVmConfig(kernelSpec(over)));
    expect(err.field).toBe(field);
    expect(err.message).toContain(field);
  });
});

describe("device and resize bodies", () => {
  it("a hot-plugged disk and NIC get the same bodies as at create, valid for their endpoints", () => {
    const disk = buildDiskConfig({
      id: "scratch",
      path: "/var/lib/vmenv/volumes/scratch.qcow2",
      format: "qcow2",
      direct: true,
    });
    expect(disk).toEqual({
      id: "scratch",
      path: "/var/lib/vmenv/volumes/scratch.qcow2",
      readonly: false,
      direct: true,
      image_type: "Qcow2",
    });
    expect(openApi.validateRequest("put", "/vm.add-disk", disk)).toEqual([]);
    const nic = buildNetConfig({ id: "eth1", tap: "tap9", mac: "02:00:00:00:00:09" });
    expect(openApi.validateRequest("put", "/vm.add-net", nic)).toEqual([]);
  });

  it("resize takes bigint sizes, sends only what changes and refuses an empty resize", () => {
    expect(buildResize({ vcpus: 3, memoryBytes: 2n * BigInt(GiB) })).toEqual({
      desired_vcpus: 3,
      desired_ram: 2 * GiB,
    });
    expect(buildResize({ balloonBytes: 256 * MiB })).toEqual({ desired_balloon: 256 * MiB });
    expect(openApi.validateRequest("put", "/vm.resize", buildResize({ vcpus: 1 }))).toEqual([]);
    expect(errorOf(() => buildResize({})).field).toBe("resize");
    expect(errorOf(() => buildResize({ vcpus: 0 })).field).toBe("vcpus");
  });
});
