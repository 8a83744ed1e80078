/**
 * Contract test: the client against cloud-hypervisor's published OpenAPI document (read as data from
 * shared/reference/). The VMM cannot run on the development hosts, so this is what stands between the
 * client and a VMM that refuses — or silently ignores — what it is sent.
 */
import { afterEach, describe, expect, it } from "vitest";
import { CH_API_PREFIX, CH_ENDPOINTS, type ChEndpointName, CloudHypervisorClient } from "./api.js";
import {
  buildDiskConfig,
  buildNetConfig,
  buildResize,
  buildVfioDeviceConfig,
  buildVmConfig,
  type ChLaunchSpec,
} from "./config.js";
import { FakeChApi, type RecordedRequest } from "./testing/fake-api.js";
import { loadChOpenApi } from "./testing/openapi.js";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const openApi = loadChOpenApi();
const endpointNames = Object.keys(CH_ENDPOINTS) as ChEndpointName[];

const fakes: FakeChApi[] = [];
afterEach(async () => {
  await Promise.all(fakes.splice(0).map((f) => f.close()));
});

async function startFake(...args: Parameters<typeof FakeChApi.start>): Promise<FakeChApi> {
  const fake = await FakeChApi.start(...args);
  fakes.push(fake);
  return fake;
}

const kernelSpec: ChLaunchSpec = {
  id: "web-1",
  vcpus: 2,
  maxVcpus: 8,
  memoryBytes: 2 * GiB,
  maxMemoryBytes: 8 * GiB,
  sharedMemory: true,
  boot: { kind: "kernel", kernel: "/images/vmlinux", initrd: "/images/initrd", cmdline: "console=ttyS0" },
  disks: [
    { id: "root", path: "/volumes/root.qcow2", format: "qcow2", direct: true },
    { id: "seed", path: "/volumes/seed.iso", readOnly: true, serial: "seed" },
  ],
  nics: [{ id: "eth0", tap: "vmenvtap0", mac: "52:54:00:12:34:56" }],
  serial: { kind: "file", path: "/run/vmenv/web-1/serial.log" },
};

const fullSpec: ChLaunchSpec = {
  id: "train-1",
  vcpus: 4,
  memoryBytes: 4 * GiB,
  hugepages: { pageSizeBytes: 2 * MiB },
  boot: { kind: "firmware", firmware: "/usr/share/cloud-hypervisor/CLOUDHV.fd" },
  disks: [{ id: "data", vhostUserSocket: "/run/vmenv/volumes/data.sock" }],
  nics: [],
  serial: { kind: "pty" },
  cpuAffinity: [{ vcpu: 0, hostCpus: [8, 9] }],
  numaNodes: [
    { guestNode: 0, vcpus: [0, 1], memoryBytes: 2 * GiB, hostNode: 0 },
    { guestNode: 1, vcpus: [2, 3], memoryBytes: 2 * GiB, hostNode: 1 },
  ],
  gpus: [{ id: "gpu0", sysfsPath: "/sys/bus/pci/devices/0000:41:00.0" }],
};

describe("the OpenAPI document, read as data", () => {
  it("loads, serves under the client's prefix, and every component schema compiles in both modes", () => {
    expect(openApi.basePath).toBe(CH_API_PREFIX);
    expect(openApi.schemaNames.length).toBeGreaterThan(40);
    for (const name of openApi.schemaNames) {
      expect(() => openApi.validate(name, {}, "published")).not.toThrow();
      expect(() => openApi.validate(name, {}, "closed")).not.toThrow();
    }
  });

  it("catches what matters: a misspelt field (closed mode only), an out-of-range integer, a missing field", () => {
    const base = buildVmConfig(kernelSpec);
    const misspelt = { ...base, cpus: { boot_vcpus: 2, max_vcpus: 8, boot_vcpu: 2 } };
    // The document closes no object: as published, a misspelt field passes (and the VMM ignores it).
    expect(openApi.validate("VmConfig", misspelt, "published")).toEqual([]);
    expect(openApi.validate("VmConfig", misspelt, "closed")).toEqual([
      "body/cpus must NOT have additional properties (boot_vcpu)",
    ]);
    expect(openApi.validate("DiskConfig", { path: "/a", pci_device_id: 256 })).toEqual([
      'body/pci_device_id must match format "uint8"',
    ]);
    const { payload: _, ...noPayload } = base;
    expect(openApi.validate("VmConfig", noPayload)).toEqual(["body must have required property 'payload'"]);
    expect(openApi.validateRequest("put", "/vm.boot", { a: 1 })).toEqual([
      "PUT /vm.boot takes no request body",
    ]);
  });
});

describe("the client's endpoint table against the document", () => {
  it("has exactly one entry per client method (but `raw`, the passthrough, whose path is its caller's)", () => {
    const methods = Object.getOwnPropertyNames(CloudHypervisorClient.prototype).filter(
      (n) => n !== "constructor" && n !== "raw",
    );
    expect(methods.sort()).toEqual([...endpointNames].sort());
  });

  it.each(endpointNames)(
    "%s: documented path and method, the documented success statuses, a body iff documented",
    (name) => {
      const endpoint = CH_ENDPOINTS[name];
      const op = openApi.operation(endpoint.method, endpoint.path);
      expect(op, `${endpoint.method} ${endpoint.path} in the document`).toBeDefined();
      if (op === undefined) return;
      expect([...endpoint.success].sort((a, b) => a - b)).toEqual(openApi.successStatuses(op));
      expect(endpoint.body).toBe(op.requestSchema !== undefined);
      if (endpoint.body) expect(op.requestRequired).toBe(true);
      // A success status with a documented JSON body is the one the client parses; 204 has none.
      for (const status of endpoint.success) {
        expect(op.responses.get(status) !== undefined, `${name} ${status} has a body`).toBe(status === 200);
      }
    },
  );
});

describe("every request the client sends, checked against its endpoint's schema", () => {
  it("covers every endpoint, with bodies valid as published and with unknown fields rejected", async () => {
    const source = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: source.socketPath });
    const answers: [schema: string, value: unknown][] = [];

    answers.push(["VmmPingResponse", await ch.ping()]);
    await ch.create(buildVmConfig(kernelSpec));
    answers.push(["VmCounters", await ch.counters()]);
    answers.push(["VmInfo", await ch.info()]);
    await ch.addDisk(buildDiskConfig({ id: "cold", path: "/volumes/cold.raw", format: "raw" }));
    await ch.boot();
    answers.push([
      "PciDeviceInfo",
      await ch.addNet(buildNetConfig({ id: "eth1", tap: "vmenvtap1", mac: "02:00:00:00:00:01" })),
    ]);
    answers.push([
      "PciDeviceInfo",
      await ch.addDevice(
        buildVfioDeviceConfig({ id: "gpu1", sysfsPath: "/sys/bus/pci/devices/0000:42:00.0" }),
      ),
    ]);
    answers.push([
      "PciDeviceInfo",
      await ch.addDisk(buildDiskConfig({ id: "hot", vhostUserSocket: "/run/hot.sock" })),
    ]);
    await ch.removeDevice({ id: "cold" });
    await ch.resize(buildResize({ vcpus: 4, memoryBytes: 4 * GiB }));
    await ch.reboot();
    await ch.powerButton();
    await ch.pause();
    await ch.snapshot({ destination_url: "file:///var/lib/vmenv/snapshots/web-1" });
    await ch.resume();
    await ch.shutdown();
    await ch.delete();
    await ch.restore({ source_url: "file:///var/lib/vmenv/snapshots/web-1", prefault: true });
    answers.push(["VmInfo", await ch.info()]);
    await ch.resume();
    await ch.delete();
    await ch.create(buildVmConfig(fullSpec));
    await ch.boot();
    await ch.sendMigration({ destination_url: "unix:/run/vmenv/migrate.sock", local: true });

    const destination = await startFake({ incomingConfig: buildVmConfig(kernelSpec) });
    const dst = new CloudHypervisorClient({ socketPath: destination.socketPath });
    await dst.receiveMigration({ receiver_url: "unix:/run/vmenv/migrate.sock" });
    answers.push(["VmInfo", await dst.info()]);
    await dst.vmmShutdown();

    const requests: RecordedRequest[] = [...source.requests, ...destination.requests];
    let bodies = 0;
    for (const r of requests) {
      const where = `${r.method} ${r.path}`;
      expect(openApi.operation(r.method, r.path), where).toBeDefined();
      expect(openApi.validateRequest(r.method, r.path, r.body, "published"), where).toEqual([]);
      expect(openApi.validateRequest(r.method, r.path, r.body, "closed"), where).toEqual([]);
      expect(r.status !== undefined && r.status < 300, `${where} answered ${r.status}`).toBe(true);
      if (r.body !== undefined) bodies++;
    }
    // The fake checked its own answers against the document, too.
    expect([...source.violations, ...destination.violations]).toEqual([]);
    for (const [schema, value] of answers) expect(openApi.validate(schema, value), schema).toEqual([]);

    const exercised = new Set(requests.map((r) => `${r.method} ${r.path}`));
    const all = endpointNames.map((n) => `${CH_ENDPOINTS[n].method} ${CH_ENDPOINTS[n].path}`);
    expect(all.filter((e) => !exercised.has(e))).toEqual([]);
    const withBody = endpointNames.filter((n) => CH_ENDPOINTS[n].body);
    expect(new Set(requests.filter((r) => r.body !== undefined).map((r) => r.path))).toEqual(
      new Set(withBody.map((n) => CH_ENDPOINTS[n].path)),
    );
    expect(bodies).toBe(12); // two creates, two add-disks and one of each other body-carrying call
  });
});
