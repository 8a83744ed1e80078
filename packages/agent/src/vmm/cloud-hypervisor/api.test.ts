import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CloudHypervisorClient } from "./api.js";
import { buildDiskConfig, buildNetConfig, buildResize, buildVmConfig, type ChLaunchSpec } from "./config.js";
import {
  CloudHypervisorApiError,
  CloudHypervisorProtocolError,
  CloudHypervisorTimeoutError,
  CloudHypervisorUnreachableError,
} from "./errors.js";
import { FakeChApi } from "./testing/fake-api.js";

const GiB = 1024 ** 3;

const spec: ChLaunchSpec = {
  id: "web-1",
  vcpus: 1,
  maxVcpus: 4,
  memoryBytes: GiB,
  maxMemoryBytes: 2 * GiB,
  boot: { kind: "kernel", kernel: "/images/vmlinux", initrd: "/images/initrd", cmdline: "console=ttyS0" },
  disks: [{ id: "root", path: "/volumes/root.raw", format: "raw" }],
  nics: [{ id: "eth0", tap: "vmenvtap0", mac: "52:54:00:00:00:01" }],
  serial: { kind: "file", path: "/run/vmenv/web-1/serial.log" },
};

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  await Promise.all(cleanups.splice(0).map((c) => c()));
});

async function startFake(...args: Parameters<typeof FakeChApi.start>): Promise<FakeChApi> {
  const fake = await FakeChApi.start(...args);
  cleanups.push(() => fake.close());
  return fake;
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "vmenv-ch-test-"));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error("expected the call to fail");
}

describe("CloudHypervisorClient against the fake API", () => {
  it("drives a VM through its lifecycle, hotplug and snapshot", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });

    expect((await ch.ping()).version).toMatch(/fake/);
    await ch.create(buildVmConfig(spec));
    expect((await ch.info()).state).toBe("Created");
    await ch.boot();
    await ch.pause();
    expect((await ch.info()).state).toBe("Paused");
    await ch.resume();

    const running = await ch.info();
    expect(running.state).toBe("Running");
    expect(running.memory_actual_size).toBe(GiB);
    expect(running.config.cpus).toEqual({ boot_vcpus: 1, max_vcpus: 4 });

    await ch.resize(buildResize({ vcpus: 2, memoryBytes: 2 * GiB }));
    const data = await ch.addDisk(
      buildDiskConfig({ id: "data", path: "/volumes/data.qcow2", format: "qcow2" }),
    );
    expect(data).toEqual({ id: "data", bdf: expect.stringMatching(/^0000:00:[0-9a-f]{2}\.0$/) });
    const eth1 = await ch.addNet(buildNetConfig({ id: "eth1", tap: "vmenvtap1", mac: "52:54:00:00:00:02" }));
    expect(eth1?.id).toBe("eth1");
    await ch.removeDevice({ id: "eth0" });

    const grown = await ch.info();
    expect(grown.memory_actual_size).toBe(2 * GiB);
    expect(grown.config.cpus?.boot_vcpus).toBe(2);
    expect(grown.config.disks?.map((d) => d.id)).toEqual(["root", "data"]);
    expect(grown.config.net?.map((n) => n.id)).toEqual(["eth1"]);

    await ch.pause(); // the VMM snapshots a paused VM only
    await ch.snapshot({ destination_url: "file:///var/lib/vmenv/snapshots/web-1" });
    await ch.resume();
    await ch.shutdown();
    expect((await ch.info()).state).toBe("Shutdown");
    await ch.delete();
    const gone = await rejection(ch.info());
    expect(gone).toBeInstanceOf(CloudHypervisorApiError);
    expect((gone as CloudHypervisorApiError).status).toBe(404);

    expect(fake.violations).toEqual([]);
    expect(fake.calls()).toEqual([
      "GET /vmm.ping",
      "PUT /vm.create",
      "GET /vm.info",
      "PUT /vm.boot",
      "PUT /vm.pause",
      "GET /vm.info",
      "PUT /vm.resume",
      "GET /vm.info",
      "PUT /vm.resize",
      "PUT /vm.add-disk",
      "PUT /vm.add-net",
      "PUT /vm.remove-device",
      "GET /vm.info",
      "PUT /vm.pause",
      "PUT /vm.snapshot",
      "PUT /vm.resume",
      "PUT /vm.shutdown",
      "GET /vm.info",
      "PUT /vm.delete",
      "GET /vm.info",
    ]);
    expect(fake.snapshots.has("file:///var/lib/vmenv/snapshots/web-1")).toBe(true);
  });

  it("sends bodies with Content-Length, never chunked, and bodiless PUTs with none", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    await ch.create(buildVmConfig(spec));
    await ch.boot();
    const [create, boot] = fake.requests;
    expect(create?.headers["content-type"]).toBe("application/json");
    expect(Number(create?.headers["content-length"])).toBe(JSON.stringify(create?.body).length);
    expect(create?.headers["transfer-encoding"]).toBeUndefined();
    expect(create?.headers.host).toBe("localhost");
    expect(boot?.body).toBeUndefined();
    expect(boot?.headers["transfer-encoding"]).toBeUndefined();
  });

  it("a cold-added device (VM not booted) answers without a PCI address", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    await ch.create(buildVmConfig(spec));
    expect(await ch.addDisk(buildDiskConfig({ id: "data", path: "/volumes/data.raw" }))).toBeUndefined();
    expect(await ch.addDevice({ id: "gpu0", path: "/sys/bus/pci/devices/0000:41:00.0" })).toBeUndefined();
    expect(fake.vm?.config.devices).toEqual([{ id: "gpu0", path: "/sys/bus/pci/devices/0000:41:00.0" }]);
    expect(fake.violations).toEqual([]);
  });

  it("turns a refusal into CloudHypervisorApiError with the status, the endpoint and the VMM's text", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });

    const notCreated = await rejection(ch.boot());
    expect(notCreated).toBeInstanceOf(CloudHypervisorApiError);
    expect(notCreated).toMatchObject({
      status: 404,
      endpoint: "PUT /api/v1/vm.boot",
      body: "Error from API: the VM is not created",
      socketPath: fake.socketPath,
    });
    expect((notCreated as Error).message).toBe(
      "cloud-hypervisor PUT /api/v1/vm.boot failed with HTTP 404: Error from API: the VM is not created",
    );

    await ch.create(buildVmConfig(spec));
    await ch.boot();
    const running = await rejection(ch.snapshot({ destination_url: "file:///snap" }));
    expect(running).toMatchObject({ status: 500, body: expect.stringContaining("paused") });

    fake.failNext("/vm.add-disk", 500, "Error from API: Failed to open disk image /volumes/x.raw");
    const disk = await rejection(ch.addDisk(buildDiskConfig({ id: "x", path: "/volumes/x.raw" })));
    expect(disk).toBeInstanceOf(CloudHypervisorApiError);
    expect(disk).toMatchObject({ status: 500, body: expect.stringContaining("Failed to open disk image") });

    const clash = await rejection(
      ch.addNet(buildNetConfig({ id: "eth0", tap: "t2", mac: "52:54:00:00:00:09" })),
    );
    expect(clash).toMatchObject({ status: 409 });
    expect(fake.violations).toEqual([]);
  });

  it("a body the schema refuses gets the 400 the VMM would send, as an API error", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    const err = await rejection(ch.resize({ desired_vcpus: 0 }));
    expect(err).toBeInstanceOf(CloudHypervisorApiError);
    expect(err).toMatchObject({ status: 400, body: expect.stringContaining("desired_vcpus") });
    expect(fake.violations).toHaveLength(1);
  });

  it("an undocumented success status or a malformed answer is a protocol error", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    fake.failNext("/vm.boot", 200, "ok");
    const boot = await rejection(ch.boot());
    expect(boot).toBeInstanceOf(CloudHypervisorProtocolError);
    expect((boot as Error).message).toContain("unexpected success status 200 (expected 204)");
    fake.failNext("/vmm.ping", 200, "not json");
    const ping = await rejection(ch.ping());
    expect(ping).toBeInstanceOf(CloudHypervisorProtocolError);
    expect((ping as Error).message).toContain("not JSON");
  });

  it("migrates: local send needs shared memory, the source VMM then goes away; the destination receives", async () => {
    const source = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: source.socketPath });
    await ch.create(buildVmConfig(spec));
    await ch.boot();
    const unshared = await rejection(ch.sendMigration({ destination_url: "unix:/run/m.sock", local: true }));
    expect(unshared).toMatchObject({ status: 500, body: expect.stringContaining("shared") });
    await ch.sendMigration({ destination_url: "tcp:192.0.2.7:6000" });
    expect(source.exited).toBe(true);
    expect(await rejection(ch.ping())).toBeInstanceOf(CloudHypervisorUnreachableError);

    const config = buildVmConfig({ ...spec, sharedMemory: true });
    const destination = await startFake({ incomingConfig: config });
    const dst = new CloudHypervisorClient({ socketPath: destination.socketPath });
    await dst.receiveMigration({ receiver_url: "tcp:0.0.0.0:6000" });
    expect((await dst.info()).config).toEqual(config);
    expect([...source.violations, ...destination.violations]).toEqual([]);
  });

  it("vmm.shutdown stops the VMM: the socket is then unreachable", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    await ch.vmmShutdown();
    const err = await rejection(ch.ping());
    expect(err).toBeInstanceOf(CloudHypervisorUnreachableError);
  });
});

describe("CloudHypervisorClient connection failures, aborts and time limits", () => {
  it("a missing socket is a clear, retry-safe error", async () => {
    const socketPath = join(await tempDir(), "api.sock");
    const ch = new CloudHypervisorClient({ socketPath });
    const err = await rejection(ch.boot());
    expect(err).toBeInstanceOf(CloudHypervisorUnreachableError);
    expect(err).toMatchObject({ code: "ENOENT", socketPath, endpoint: "PUT /api/v1/vm.boot" });
    expect((err as Error).message).toBe(
      `cloud-hypervisor API socket ${socketPath} not reachable: no such socket (PUT /api/v1/vm.boot not sent)`,
    );
  });

  it("a socket nobody listens on is refused", async () => {
    const socketPath = join(await tempDir(), "api.sock");
    await writeFile(socketPath, ""); // what a dead VMM leaves behind behaves the same: ECONNREFUSED
    const err = await rejection(new CloudHypervisorClient({ socketPath }).ping());
    expect(err).toBeInstanceOf(CloudHypervisorUnreachableError);
    expect(err).toMatchObject({ code: "ECONNREFUSED" });
    expect((err as Error).message).toMatch(
      /^cloud-hypervisor API socket .* not reachable: connection refused/,
    );
  });

  it("aborting a call rejects it with the signal's reason", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    fake.holdNext("/vm.create");
    const controller = new AbortController();
    const arrived = fake.nextRequest("/vm.create");
    const call = ch.create(buildVmConfig(spec), { signal: controller.signal });
    await arrived;
    const reason = new Error("operation cancelled");
    controller.abort(reason);
    expect(await rejection(call)).toBe(reason);
  });

  it("an already aborted signal sends nothing", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath });
    const err = await rejection(ch.boot({ signal: AbortSignal.abort() }));
    expect((err as Error).name).toBe("AbortError");
    // A later call on the same socket shows the first one never reached it.
    await ch.ping();
    expect(fake.calls()).toEqual(["GET /vmm.ping"]);
  });

  it("a call without an answer in time fails with a timeout error", async () => {
    const fake = await startFake();
    fake.holdNext("/vm.info");
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath, timeoutMs: 60_000 });
    const started = Date.now();
    const err = await rejection(ch.info({ timeoutMs: 100 }));
    expect(err).toBeInstanceOf(CloudHypervisorTimeoutError);
    expect(err).toMatchObject({ timeoutMs: 100, endpoint: "GET /api/v1/vm.info" });
    expect(Date.now() - started).toBeLessThan(5_000);
    // The client's own limit applies when the call gives none.
    fake.holdNext("/vm.info");
    const short = new CloudHypervisorClient({ socketPath: fake.socketPath, timeoutMs: 50 });
    expect(await rejection(short.info())).toBeInstanceOf(CloudHypervisorTimeoutError);
  });

  it("snapshot and migration calls get the long limit (none by default), not the short one", async () => {
    const fake = await startFake();
    const ch = new CloudHypervisorClient({ socketPath: fake.socketPath, timeoutMs: 50 });
    await ch.create(buildVmConfig(spec));
    await ch.boot();
    await ch.pause();
    fake.holdNext("/vm.snapshot");
    const controller = new AbortController();
    const arrived = fake.nextRequest("/vm.snapshot");
    const snapshot = ch.snapshot({ destination_url: "file:///snap" }, { signal: controller.signal });
    await arrived;
    await new Promise((r) => setTimeout(r, 200)); // well past the 50 ms limit of ordinary calls
    controller.abort();
    expect((await rejection(snapshot)) as Error).not.toBeInstanceOf(CloudHypervisorTimeoutError);
  });
});
