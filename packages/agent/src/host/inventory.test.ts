import { describe, expect, it } from "vitest";
import {
  HostInventoryParseError,
  memorySummary,
  nodeMemory,
  parseCloudHypervisorVersion,
  parseCount,
  parseCpuinfo,
  parseCpuList,
  parseHugepageDirName,
  parseMeminfo,
  parseQemuVersion,
  parseUptime,
  summarizeCpu,
} from "./inventory.js";

// Two processor blocks as this development host (a Firecracker guest on AMD EPYC) prints them.
const EPYC_GUEST_CPUINFO = [0, 1]
  .map(
    (cpu) => `processor\t: ${cpu}
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
cpu MHz\t\t: 2596.146
cache size\t: 1024 KB
physical id\t: 0
siblings\t: 2
core id\t\t: ${cpu}
cpu cores\t: 2
apicid\t\t: ${cpu}
initial apicid\t: ${cpu}
fpu\t\t: yes
fpu_exception\t: yes
cpuid level\t: 28
wp\t\t: yes
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso spectre_v2_user
bogomips\t: 5192.29
TLB size\t: 3584 4K pages
clflush size\t: 64
cache_alignment\t: 64
address sizes\t: 48 bits physical, 48 bits virtual
power management:
`,
  )
  .join("\n");

describe("parseCpuinfo / summarizeCpu", () => {
  it("reads an x86 guest's cpuinfo: one socket, two cores, flags of a nested host", () => {
    const procs = parseCpuinfo(EPYC_GUEST_CPUINFO);
    expect(procs.map((p) => [p.processor, p.physicalId, p.coreId])).toEqual([
      [0, 0, 0],
      [1, 0, 1],
    ]);
    expect(summarizeCpu(procs)).toEqual({
      model: "AMD EPYC",
      vendor: "AuthenticAMD",
      sockets: 1,
      cores: 2,
      threads: 2,
      // No svm: this guest's CPU does not offer hardware virtualisation, whatever /dev/kvm says.
      virtualizationFlags: ["avx", "avx2", "avx512f", "aes", "x2apic", "pdpe1gb", "hypervisor"],
    });
  });

  it("counts sockets and cores from physical id/core id with SMT siblings", () => {
    const block = (cpu: number, pkg: number, core: number) =>
      `processor\t: ${cpu}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nphysical id\t: ${pkg}\ncore id\t\t: ${core}\nflags\t\t: vmx avx\nvmx flags\t: ept vpid unrestricted_guest\n`;
    const text = [block(0, 0, 0), block(1, 1, 0), block(2, 0, 0), block(3, 1, 0)].join("\n");
    expect(summarizeCpu(parseCpuinfo(text))).toMatchObject({
      sockets: 2,
      cores: 2,
      threads: 4,
      virtualizationFlags: ["vmx", "ept", "vpid", "avx"],
    });
  });

  it("reports a flag only when every CPU has it", () => {
    const text = "processor\t: 0\nflags\t\t: avx avx2\n\nprocessor\t: 1\nflags\t\t: avx\n";
    expect(summarizeCpu(parseCpuinfo(text)).virtualizationFlags).toEqual(["avx"]);
  });

  it("falls back to sysfs topology when cpuinfo has no physical id, then to one socket", () => {
    const text = "processor\t: 0\nFeatures\t: fp asimd aes\n\nprocessor\t: 1\nFeatures\t: fp asimd aes\n";
    const procs = parseCpuinfo(`${text}\nHardware\t: BCM2835\n`);
    expect(procs).toHaveLength(2);
    const topo = [
      { cpu: 0, packageId: 0, coreId: 0 },
      { cpu: 1, packageId: 0, coreId: 0 },
    ];
    expect(summarizeCpu(procs, topo)).toMatchObject({
      sockets: 1,
      cores: 1,
      threads: 2,
      model: "",
      vendor: "",
    });
    expect(summarizeCpu(procs, topo.slice(0, 1))).toMatchObject({ sockets: 1, cores: 2, threads: 2 });
    expect(summarizeCpu(procs).virtualizationFlags).toEqual(["aes"]);
  });

  it("summarises nothing as zero", () => {
    expect(summarizeCpu(parseCpuinfo(""))).toEqual({
      model: "",
      vendor: "",
      sockets: 0,
      cores: 0,
      threads: 0,
      virtualizationFlags: [],
    });
  });
});

describe("parseMeminfo", () => {
  const PROC_MEMINFO = `MemTotal:       24684092 kB
MemFree:        23708164 kB
MemAvailable:   24319776 kB
Buffers:           29996 kB
Cached:           753508 kB
VmallocTotal:   34359738367 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
`;

  it("turns kB into bytes and keeps unit-less counts", () => {
    const m = parseMeminfo(PROC_MEMINFO);
    expect(m.get("MemTotal")).toBe(24684092n * 1024n);
    expect(m.get("VmallocTotal")).toBe(34359738367n * 1024n);
    expect(m.get("HugePages_Total")).toBe(0n);
    expect(m.get("Hugepagesize")).toBe(2n * 1024n * 1024n);
    expect(memorySummary(m)).toEqual({
      totalBytes: 24684092n * 1024n,
      availableBytes: 24319776n * 1024n,
      freeBytes: 23708164n * 1024n,
    });
  });

  it("estimates MemAvailable on kernels before 3.14", () => {
    const m = parseMeminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 20 kB\n");
    expect(memorySummary(m).availableBytes).toBe(130n * 1024n);
  });

  it("drops the Node N prefix of a node's meminfo", () => {
    const m = parseMeminfo(
      "Node 0 MemTotal:        5073108 kB\nNode 0 MemFree:         4097232 kB\nNode 0 HugePages_Free:      0\n",
    );
    expect(nodeMemory(m)).toEqual({ totalBytes: 5073108n * 1024n, freeBytes: 4097232n * 1024n });
    expect(m.get("HugePages_Free")).toBe(0n);
  });

  it("rejects what is not meminfo, and meminfo without MemTotal", () => {
    expect(() => parseMeminfo("MemTotal: lots\n")).toThrow(HostInventoryParseError);
    expect(() => memorySummary(parseMeminfo("MemFree: 1 kB\n"))).toThrow(/no MemTotal/);
  });
});

describe("parseCpuList", () => {
  it.each([
    ["0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]],
    ["0-1,4-5", [0, 1, 4, 5]],
    ["5", [5]],
    ["3,1,1-2", [1, 2, 3]],
    ["\n", []],
    ["", []],
  ])("%j", (text, cpus) => {
    expect(parseCpuList(text)).toEqual(cpus);
  });

  it.each(["0-", "a", "3-1", "1,,2"])("rejects %j", (text) => {
    expect(() => parseCpuList(text)).toThrow(HostInventoryParseError);
  });
});

describe("small sysfs and procfs values", () => {
  it("reads huge page folder names", () => {
    expect(parseHugepageDirName("hugepages-2048kB")).toBe(2097152n);
    expect(parseHugepageDirName("hugepages-1048576kB")).toBe(1073741824n);
    expect(parseHugepageDirName("hugepages-64kB")).toBe(65536n);
    expect(parseHugepageDirName("demote")).toBeUndefined();
  });

  it("reads counts and uptime", () => {
    expect(parseCount("512\n", "nr_hugepages")).toBe(512n);
    expect(() => parseCount("-1\n", "physical_package_id")).toThrow(/not a count/);
    expect(parseUptime("241.23 382.82\n")).toBe(241.23);
    expect(() => parseUptime("")).toThrow(HostInventoryParseError);
  });
});

describe("VMM version banners", () => {
  it("reads QEMU's --version", () => {
    expect(
      parseQemuVersion(
        "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n",
      ),
    ).toEqual({ version: "7.2.22", package: "Debian 1:7.2+dfsg-7+deb12u18+b3" });
    expect(parseQemuVersion("QEMU emulator version 8.2.0\n")).toEqual({
      version: "8.2.0",
      package: undefined,
    });
    expect(() => parseQemuVersion("qemu-img version 7.2.22\n")).toThrow(HostInventoryParseError);
  });

  it("reads cloud-hypervisor's --version", () => {
    expect(parseCloudHypervisorVersion("cloud-hypervisor v38.0.0\n")).toBe("38.0.0");
    expect(parseCloudHypervisorVersion("cloud-hypervisor v40.0-12-gabcdef-dirty\n")).toBe(
      "40.0-12-gabcdef-dirty",
    );
    expect(() => parseCloudHypervisorVersion("firecracker v1.7.0")).toThrow(HostInventoryParseError);
  });
});
