/**
 * The driver against a fake `cloud-hypervisor` executable (testing/fake-cloud-hypervisor.mjs): a real
 * detached process with the real binary's command line, API socket (validated against the published
 * OpenAPI document), event monitor file and serial socket, but no guest. See README.md for what that
 * leaves unproven.
 */
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { VmenvError } from "@vmenv/rpc/errors";
import { afterEach, describe, expect, it } from "vitest";
import {
  CloudHypervisorDriver,
  type CloudHypervisorDriverOptions,
} from "../packages/agent/src/vmm/cloud-hypervisor/driver.js";
import {
  type FakeChJournalEntry,
  fakeChJournal,
} from "../packages/agent/src/vmm/cloud-hypervisor/testing/fake-vmm.js";
import { loadChOpenApi } from "../packages/agent/src/vmm/cloud-hypervisor/testing/openapi.js";
import { MIB, type VmSpec } from "../packages/agent/src/vmm/domain.js";
import type { LaunchRequest, RunningVmm, VmPaths } from "../packages/agent/src/vmm/driver.js";
import { alive, killHard, waitGone } from "../packages/agent/src/vmm/process.js";

const FAKE = fileURLToPath(
  new URL("../packages/agent/src/vmm/cloud-hypervisor/testing/fake-cloud-hypervisor.mjs", import.meta.url),
);
const openApi = loadChOpenApi();

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  const errors: unknown[] = [];
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch (e) {
      errors.push(e);
    }
  }
  if (errors.length > 0) throw errors[0];
});

/** A VM folder as the agent's store lays it out; its VMM (found by its pid file) is killed afterwards. */
async function vmFolder(id = "web-1"): Promise<VmPaths> {
  const root = await mkdtemp(join(tmpdir(), "vmenv-chd-"));
  const dir = join(root, "vms", id);
  await mkdir(dir, { recursive: true });
  const paths: VmPaths = {
    dir,
    record: join(dir, "vm.json"),
    control: join(dir, "api.sock"),
    serialSocket: join(dir, "serial.sock"),
    serialLog: join(dir, "serial.log"),
    pidFile: join(dir, "vmm.pid"),
  };
  cleanups.push(async () => {
    const pid = Number((await readFile(paths.pidFile, "utf8").catch(() => "")).trim());
    if (pid > 0 && alive(pid)) {
      killHard(pid);
      await waitGone(pid, 5000);
    }
    await rm(root, { recursive: true, force: true });
  });
  return paths;
}

/** Stops watching a VMM after the test, whatever happened; the folder's cleanup kills the process. */
function track<T extends RunningVmm | undefined>(vmm: T): T {
  if (vmm) cleanups.push(() => vmm.detach());
  return vmm;
}

function driver(opts: Partial<CloudHypervisorDriverOptions> = {}): CloudHypervisorDriver {
  return new CloudHypervisorDriver({ binary: async () => FAKE, ...opts });
}

const spec: VmSpec = {
  vmm: "cloud-hypervisor",
  accelerator: undefined,
  vcpus: 2,
  maxVcpus: 4,
  memoryBytes: 512n * MIB,
  maxMemoryBytes: 1024n * MIB,
  hostCpus: [0, 1],
  boot: {
    kind: "kernel",
    kernelPath: "/images/vmlinux",
    initrdPath: "/images/initrd.img",
    cmdline: "console=ttyS0",
  },
};

function request(paths: VmPaths, over: Partial<LaunchRequest> = {}): LaunchRequest {
  return { id: "web-1", spec, accelerator: "kvm", paths, paused: false, disks: [], nics: [], ...over };
}

async function journal(paths: VmPaths): Promise<FakeChJournalEntry[]> {
  const text = await readFile(fakeChJournal(paths.control), "utf8").catch(() => "");
  return text
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => JSON.parse(l) as FakeChJournalEntry);
}

/** `METHOD /path` of each request the fake got, repeated pings folded into one. */
async function calls(paths: VmPaths): Promise<string[]> {
  const out: string[] = [];
  for (const e of await journal(paths)) {
    const c = `${e.method} ${e.path}`;
    if (c !== out.at(-1) || c !== "GET /vmm.ping") out.push(c);
  }
  return out;
}

/** Every request the driver sent is documented and its body valid (unknown fields rejected), and answered. */
async function expectContract(paths: VmPaths): Promise<number> {
  const entries = await journal(paths);
  for (const e of entries) {
    const where = `${e.method} ${e.path}`;
    expect(e.violations, where).toEqual([]);
    expect(openApi.operation(e.method, e.path), where).toBeDefined();
    expect(openApi.validateRequest(e.method, e.path, e.body, "published"), where).toEqual([]);
    expect(openApi.validateRequest(e.method, e.path, e.body, "closed"), where).toEqual([]);
  }
  return entries.length;
}

async function until<T>(
  what: string,
  f: () => Promise<T | undefined> | T | undefined,
  ms = 5000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(25);
  }
}

async function logHas(paths: VmPaths, text: string, times = 1): Promise<void> {
  await until(`${JSON.stringify(text)} ×${times} in serial.log`, async () => {
    const log = await readFile(paths.serialLog, "utf8").catch(() => "");
    return log.split(text).length - 1 >= times || undefined;
  });
}

async function rejection(p: Promise<unknown>): Promise<VmenvError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(VmenvError);
    return e as VmenvError;
  }
  throw new Error("expected a rejection");
}

/** A console client on the agent's serial socket, collecting what it reads. */
async function consoleClient(paths: VmPaths): Promise<{ socket: net.Socket; text: () => string }> {
  const socket = net.connect({ path: paths.serialSocket });
  await once(socket, "connect");
  let text = "";
  socket.on("data", (d: Buffer) => {
    text += d.toString("latin1");
  });
  cleanups.push(() => void socket.destroy());
  return { socket, text: () => text };
}

/** A wrapper "binary" that runs the fake with environment knobs set. */
async function fakeWith(env: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "vmenv-chd-bin-"));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, "cloud-hypervisor");
  const vars = Object.entries(env)
    .map(([k, v]) => `${k}='${v}'`)
    .join(" ");
  await writeFile(path, `#!/bin/sh\n${vars} exec '${FAKE}' "$@"\n`);
  await chmod(path, 0o755);
  return path;
}

describe("availability", () => {
  it("is unavailable, with the reason, when no binary was found; a launch then fails VMM_UNAVAILABLE", async () => {
    const d = new CloudHypervisorDriver({ binary: async () => undefined });
    expect(d.kind).toBe("cloud-hypervisor");
    expect(await d.availability()).toEqual({
      available: false,
      reason: "cloud-hypervisor not found on PATH",
    });
    const paths = await vmFolder();
    const e = await rejection(d.launch(request(paths)));
    expect(e.reason).toBe("VMM_UNAVAILABLE");
    expect(e.message).toContain("vms/web-1");
    expect(await driver().availability()).toEqual({ available: true });
  });
});

describe("launch", () => {
  it("starts a detached VMM, writes its pid, creates and boots the VM from the spec", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));

    expect(alive(vmm.pid)).toBe(true);
    expect((await readFile(paths.pidFile, "utf8")).trim()).toBe(String(vmm.pid));
    // Its own session (setsid): it does not go down with the agent's process group or terminal.
    const statLine = await readFile(`/proc/${vmm.pid}/stat`, "latin1");
    const fields = statLine.slice(statLine.lastIndexOf(")") + 2).split(" ");
    expect(fields[3]).toBe(String(vmm.pid)); // session id
    const argv = (await readFile(`/proc/${vmm.pid}/cmdline`, "utf8")).split("\0");
    expect(argv.slice(argv.indexOf("--api-socket"), -1)).toEqual([
      "--api-socket",
      `path=${paths.control}`,
      "--event-monitor",
      `path=${join(paths.dir, "ch-events.json")}`,
    ]);

    expect(await vmm.status()).toBe("running");
    expect(await calls(paths)).toEqual(["GET /vmm.ping", "PUT /vm.create", "PUT /vm.boot", "GET /vm.info"]);
    const create = (await journal(paths)).find((e) => e.path === "/vm.create");
    expect(create?.body).toEqual({
      cpus: {
        boot_vcpus: 2,
        max_vcpus: 4,
        affinity: [0, 1, 2, 3].map((vcpu) => ({ vcpu, host_cpus: [0, 1] })),
      },
      memory: { size: 512 * 1024 * 1024, hotplug_size: 512 * 1024 * 1024 },
      payload: { kernel: "/images/vmlinux", initramfs: "/images/initrd.img", cmdline: "console=ttyS0" },
      serial: { mode: "Socket", socket: join(paths.dir, "ch-serial.sock") },
      console: { mode: "Off" },
    });
    await expectContract(paths);
  });

  it("with paused: creates the VM without booting it; resume boots it", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths, { paused: true })));
    expect(await vmm.status()).toBe("paused");
    expect(await vmm.passthrough("vm.info", undefined)).toMatchObject({ state: "Created" });
    expect(await calls(paths)).not.toContain("PUT /vm.boot");
    await vmm.resume();
    expect(await vmm.status()).toBe("running");
    expect((await calls(paths)).slice(-3)).toEqual(["GET /vm.info", "PUT /vm.boot", "GET /vm.info"]);
    await expectContract(paths);
  });

  it("replaces the files a previous run left (a stale serial socket would make vm.create fail)", async () => {
    const paths = await vmFolder();
    for (const f of [join(paths.dir, "ch-serial.sock"), paths.serialSocket, paths.control, paths.pidFile]) {
      await writeFile(f, "stale");
    }
    const vmm = track(await driver().launch(request(paths)));
    expect(await vmm.status()).toBe("running");
    expect((await stat(paths.serialSocket)).isSocket()).toBe(true);
  });

  it("does not start a second VMM over one that still serves the VM's API socket", async () => {
    const paths = await vmFolder();
    const d = driver();
    const first = track(await d.launch(request(paths)));
    const e = await rejection(d.launch(request(paths)));
    expect(e.reason).toBe("VMM_START_FAILED");
    expect(e.message).toBe(
      `cloud-hypervisor did not start vms/web-1: a cloud-hypervisor process still serves its API socket ${paths.control}`,
    );
    expect(await first.status()).toBe("running");
    expect((await readFile(paths.pidFile, "utf8")).trim()).toBe(String(first.pid));
  });

  it("fails VMM_START_FAILED, naming the VM and saying why, when the process ends at start", async () => {
    const dir = await mkdtemp(join(tmpdir(), "vmenv-chd-bin-"));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const broken = join(dir, "cloud-hypervisor");
    await writeFile(
      broken,
      '#!/bin/sh\necho "Error: Cloud Hypervisor exited with the following error:" >&2\necho "  Error creating hypervisor: /dev/kvm: No such file or directory" >&2\nexit 1\n',
    );
    await chmod(broken, 0o755);
    const paths = await vmFolder();
    const e = await rejection(driver({ binary: async () => broken }).launch(request(paths)));
    expect(e.reason).toBe("VMM_START_FAILED");
    expect(e.metadata.vm).toBe("vms/web-1");
    expect(e.message).toMatch(
      /^cloud-hypervisor did not start vms\/web-1: the process ended \(exit status 1\)/,
    );
    expect(e.message).toContain("Error creating hypervisor: /dev/kvm: No such file or directory");
    await expect(stat(paths.pidFile)).rejects.toThrow();
  });

  it("fails VMM_START_FAILED when the VMM refuses to boot, and ends the process it started", async () => {
    const paths = await vmFolder();
    const d = driver({ binary: () => fakeWith({ FAKE_CH_REFUSE: "/vm.boot" }) });
    const e = await rejection(d.launch(request(paths)));
    expect(e.reason).toBe("VMM_START_FAILED");
    expect(e.message).toBe(
      "cloud-hypervisor did not start vms/web-1: vm.boot was refused: Error from API: refused (FAKE_CH_REFUSE=/vm.boot)",
    );
    const entries = await journal(paths);
    expect(entries.at(-1)).toMatchObject({ path: "/vmm.shutdown", status: 204 });
    const ping = entries.find((x) => x.path === "/vmm.ping");
    expect(ping?.status).toBe(200);
    await expect(stat(paths.pidFile)).rejects.toThrow();
    expect(await expectContract(paths)).toBeGreaterThan(3);
  });

  it("refuses what cloud-hypervisor cannot run before starting anything: TCG, disk boot", async () => {
    const paths = await vmFolder();
    const tcg = await rejection(driver().launch(request(paths, { accelerator: "tcg" })));
    expect(tcg.reason).toBe("VMM_START_FAILED");
    expect(tcg.message).toBe(
      "cloud-hypervisor did not start vms/web-1: cloud-hypervisor runs guests with KVM only, and this VM is to run with tcg",
    );
    const disk = await rejection(
      driver().launch(
        request(paths, {
          spec: {
            ...spec,
            boot: { kind: "disk", diskId: "root", firmware: "uefi", firmwarePath: undefined },
          },
        }),
      ),
    );
    expect(disk.reason).toBe("VMM_START_FAILED");
    expect(disk.message).toContain("disk boot is not supported yet");
    await expect(stat(paths.pidFile)).rejects.toThrow();
    expect(await journal(paths)).toEqual([]);
  });

  it("stops, and ends the process, when the caller aborts", async () => {
    const paths = await vmFolder();
    const d = driver({ binary: () => fakeWith({ FAKE_CH_HOLD: "/vm.boot" }) });
    const ac = new AbortController();
    const launching = d.launch(request(paths), ac.signal);
    const pid = await until("the pid file", async () => {
      const n = Number((await readFile(paths.pidFile, "utf8").catch(() => "")).trim());
      return n > 0 ? n : undefined;
    });
    await until("vm.boot sent", async () => (await calls(paths)).includes("PUT /vm.boot") || undefined);
    ac.abort(new Error("caller went away"));
    await expect(launching).rejects.toThrow("caller went away");
    expect(alive(pid)).toBe(false);
  });
});

describe("a running VMM", () => {
  it("pauses, resumes and resets, reporting each through its events", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    const seen: string[] = [];
    for (const name of ["stop", "resume", "reset"] as const) vmm.on(name, () => seen.push(name));

    await vmm.pause();
    expect(await vmm.status()).toBe("paused");
    await until("stop", () => seen.includes("stop") || undefined);
    await vmm.resume();
    expect(await vmm.status()).toBe("running");
    await until("resume", () => seen.includes("resume") || undefined);
    await vmm.reset();
    await until("reset", () => seen.includes("reset") || undefined);
    expect(seen.slice(0, 3)).toEqual(["stop", "resume", "reset"]);

    // A refusal names the VM and what was refused.
    await vmm.pause();
    const e = await rejection(vmm.pause());
    expect(e.code).toBe("failed-precondition");
    expect(e.reason).toBe("VMM_REFUSED");
    expect(e.message).toBe(
      "cloud-hypervisor of vms/web-1 refused vm.pause: Error from API: cannot pause a VM that is Paused",
    );
    await expectContract(paths);
  });

  it("relays the serial console: output to serial.log and every client, input to the guest, across a reboot", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    // What the guest printed before anyone read its console is replayed and logged.
    await logHas(paths, "fake guest: ready");
    expect(await readFile(paths.serialLog, "utf8")).toContain("booting /images/vmlinux (console=ttyS0)");

    const a = await consoleClient(paths);
    const b = await consoleClient(paths);
    a.socket.write("hello from a\n");
    await until("the echo on both clients", () =>
      a.text().includes("hello from a") && b.text().includes("hello from a") ? true : undefined,
    );
    await logHas(paths, "hello from a");

    await vmm.reset();
    // The VMM re-makes its socket on reboot; the relay reconnects, and the clients stay connected.
    await logHas(paths, "fake guest: ready", 2);
    await until("the second boot on a client", () => a.text().includes("fake guest: ready") || undefined);
    b.socket.write("after reboot\n");
    await until("the echo after the reboot", () => a.text().includes("after reboot") || undefined);
  });

  it("powerdown: the guest powers off, the VMM exits, and the exit is a guest shutdown", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    const exitEvent = once(vmm, "exit");
    await vmm.powerdown();
    expect(await vmm.exited()).toBe("guest-shutdown");
    expect(await exitEvent).toEqual(["guest-shutdown"]);
    expect(alive(vmm.pid)).toBe(false);
    await expect(stat(paths.serialSocket)).rejects.toThrow(); // the relay is gone with the VMM
    await expectContract(paths);
  });

  it("kill: vmm.shutdown ends the process; the exit is a host request", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    await vmm.kill();
    expect(alive(vmm.pid)).toBe(false);
    expect(await vmm.exited()).toBe("host-request");
    expect((await calls(paths)).at(-1)).toBe("PUT /vmm.shutdown");
    await expectContract(paths);
  });

  it("kill: a VMM that does not answer gets SIGKILL after the grace time", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver({ killGraceMs: 300 }).launch(request(paths)));
    process.kill(vmm.pid, "SIGSTOP");
    const t0 = Date.now();
    await vmm.kill();
    expect(alive(vmm.pid)).toBe(false);
    expect(await vmm.exited()).toBe("host-request");
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it("a VMM killed by someone else: the exit is noticed, its cause unknown", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    killHard(vmm.pid);
    expect(await vmm.exited()).toBe("unknown");
  });

  it("hot-plugs vCPUs and memory with vm.resize", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    await vmm.hotplugVcpus(3);
    await vmm.hotplugMemory(256n * MIB);
    const resizes = (await journal(paths)).filter((e) => e.path === "/vm.resize").map((e) => e.body);
    expect(resizes).toEqual([{ desired_vcpus: 3 }, { desired_ram: 768 * 1024 * 1024 }]);
    expect(await vmm.passthrough("vm.info", {})).toMatchObject({
      config: { cpus: { boot_vcpus: 3 } },
      memory_actual_size: 768 * 1024 * 1024,
    });
    const e = await rejection(vmm.hotplugMemory(1024n * MIB));
    expect(e.reason).toBe("VMM_REFUSED");
    await expectContract(paths);
  });

  it("passes REST calls through: endpoint name, JSON body, JSON answer", async () => {
    const paths = await vmFolder();
    const vmm = track(await driver().launch(request(paths)));
    expect(await vmm.passthrough("vmm.ping", undefined)).toMatchObject({ pid: vmm.pid });
    expect(await vmm.passthrough("vm.counters", undefined)).toEqual({});
    expect(await vmm.passthrough("vm.resize", { desired_vcpus: 4 })).toBeUndefined();
    expect(await vmm.passthrough("GET /vm.info", undefined)).toMatchObject({ state: "Running" });

    const bad = await rejection(vmm.passthrough("query-status", undefined));
    expect(bad.code).toBe("invalid-argument");
    const refused = await rejection(vmm.passthrough("vm.resume", undefined));
    expect(refused.code).toBe("invalid-argument");
    expect(refused.message).toContain("cloud-hypervisor of vms/web-1 refused vm.resume");
    await expectContract(paths);
  });
});

describe("adopt", () => {
  it("a new driver (agent restart) takes over by pid: state, console, control and exit", async () => {
    const paths = await vmFolder();
    const first = await driver().launch(request(paths));
    await first.pause();
    first.detach(); // the agent stops; the VMM runs on
    await delay(150);
    expect(alive(first.pid)).toBe(true);

    const vmm = track(await driver().adopt(paths, first.pid));
    if (!vmm) throw new Error("not adopted");
    expect(vmm.pid).toBe(first.pid);
    expect(await vmm.status()).toBe("paused");
    const seen: string[] = [];
    for (const name of ["stop", "resume", "reset"] as const) vmm.on(name, () => seen.push(name));
    await vmm.resume();
    await until("resume", () => seen.includes("resume") || undefined);
    expect(seen).toEqual(["resume"]); // the pause before the restart is not replayed

    const client = await consoleClient(paths);
    client.socket.write("still there\n");
    await until("the echo", () => client.text().includes("still there") || undefined);

    await vmm.kill();
    expect(await vmm.exited()).toBe("host-request");
    expect(alive(first.pid)).toBe(false);
    await expectContract(paths);
  });

  it("is undefined for a dead pid, a pid that is no VMM of this VM, and a VMM that holds no VM", async () => {
    const paths = await vmFolder();
    const d = driver();
    const dead = spawnSync("true").pid;
    expect(await d.adopt(paths, dead)).toBeUndefined();
    expect(await d.adopt(paths, process.pid)).toBeUndefined(); // alive, but nothing answers on the socket

    // A VMM whose launch was cut short between the spawn and vm.create: shut down, not adopted.
    const orphan = spawn(FAKE, ["--api-socket", `path=${paths.control}`], { stdio: "ignore" });
    const pid = orphan.pid as number;
    cleanups.push(() => {
      if (alive(pid)) killHard(pid);
    });
    await until("the orphan's API", async () =>
      (await stat(paths.control).catch(() => undefined))?.isSocket(),
    );
    expect(await d.adopt(paths, pid)).toBeUndefined();
    expect(await waitGone(pid, 5000)).toBe(true);

    // A live VMM of another VM: its ping reports another pid.
    const other = await vmFolder("db-1");
    const vmm = track(await d.launch(request(other, { id: "db-1" })));
    expect(await d.adopt(other, process.pid)).toBeUndefined();
    expect(alive(vmm.pid)).toBe(true);
  });
});

describe("the fake binary", () => {
  it("fails loudly on an option it does not know, as the real one does", () => {
    const r = spawnSync(FAKE, ["--api-socket", "path=/nonexistent/api.sock", "--no-such-option"], {
      encoding: "utf8",
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("error: unexpected argument '--no-such-option' found");
  });
});
