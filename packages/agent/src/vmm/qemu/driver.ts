import { EventEmitter } from "node:events";
import { readFile, rm } from "node:fs/promises";
import { setTimeout as delay } from "node:timers/promises";
import { VmenvError } from "@vmenv/rpc/errors";
import { execa } from "execa";
import type {
  AttachedDisk,
  AttachedGpu,
  AttachedNic,
  ExitCause,
  LaunchRequest,
  RunningVmm,
  VmmCounters,
  VmmDriver,
  VmPaths,
} from "../driver.js";
import { alive, killHard, waitGone } from "../process.js";
import { diskObjects, exportedDiskObjects, hotplugGpu, qemuArgs } from "./cmdline.js";
import { type QmpBalloon, type QmpBlockStats, type QmpCpu, qemuCounters } from "./counters.js";
import { QemuMigration } from "./migration.js";
import { QmpClient, QmpError, type QmpEvent } from "./qmp.js";

/** The process name QEMU gives itself (`-name …,process=vmenv-<id>`), to tell our QEMU from a reused pid. */
async function commOf(pid: number): Promise<string | undefined> {
  return readFile(`/proc/${pid}/comm`, "utf8").then(
    (s) => s.trim(),
    () => undefined,
  );
}

export interface QemuDriverOptions {
  /** qemu-system-* binary; undefined when none was found. */
  binary: () => Promise<string | undefined>;
}

/** The QEMU driver: a daemonized qemu-system process per VM, driven over QMP. */
export class QemuDriver implements VmmDriver {
  readonly kind = "qemu" as const;
  constructor(private readonly opts: QemuDriverOptions) {}

  async availability() {
    const b = await this.opts.binary();
    return b
      ? ({ available: true } as const)
      : ({ available: false, reason: "no qemu-system binary found on this host" } as const);
  }

  async launch(req: LaunchRequest, signal?: AbortSignal): Promise<RunningVmm> {
    const binary = await this.opts.binary();
    if (!binary) {
      throw new VmenvError("failed-precondition", "QEMU is not available on this host", {
        reason: "VMM_UNAVAILABLE",
        metadata: { vmm: "qemu" },
      });
    }
    await Promise.all(
      [req.paths.control, req.paths.serialSocket, req.paths.pidFile].map((p) => rm(p, { force: true })),
    );
    // With -daemonize the first process exits once QEMU is set up: its exit status and stderr say
    // whether the command line worked. The daemon itself is nobody's child and outlives the agent.
    const r = await execa(binary, qemuArgs(req), {
      reject: false,
      timeout: 30_000,
      // Not cancelled half-way: a QEMU killed while it daemonizes may leave its daemon behind. A cancel
      // is honoured once the daemon is known (below).
      stdin: "ignore",
    });
    if (r.exitCode !== 0) {
      const msg =
        (r.stderr || r.stdout || `exit ${r.exitCode ?? r.signal}`).split("\n").find((l) => l.trim()) ?? "";
      throw new VmenvError(
        "failed-precondition",
        `QEMU did not start: ${msg.replace(/^qemu-system-\w+: /, "")}`,
        {
          reason: "VMM_START_FAILED",
          metadata: { vm: `vms/${req.id}` },
        },
      );
    }
    const pid = Number((await readFile(req.paths.pidFile, "utf8")).trim());
    if (signal?.aborted) {
      killHard(pid);
      await waitGone(pid, 5000);
      signal.throwIfAborted();
    }
    const vmm = await QemuVmm.connect(req.paths, pid);
    if (!vmm) throw new Error(`QEMU for vms/${req.id} exited right after it started`);
    return vmm;
  }

  async adopt(paths: VmPaths, pid: number): Promise<RunningVmm | undefined> {
    if (!alive(pid)) return undefined;
    const comm = await commOf(pid);
    if (comm !== undefined && !comm.startsWith("vmenv-") && !comm.startsWith("qemu")) return undefined; // pid reused
    return QemuVmm.connect(paths, pid);
  }
}

class QemuVmm
  extends EventEmitter<{ exit: [ExitCause]; reset: []; stop: []; resume: [] }>
  implements RunningVmm
{
  #exit: Promise<ExitCause>;
  #cause: ExitCause = "unknown";
  #detached = false;

  private constructor(
    readonly pid: number,
    private readonly qmp: QmpClient,
  ) {
    super();
    qmp.on("event", (e: QmpEvent) => {
      if (e.event === "SHUTDOWN") this.#cause = e.data.guest === true ? "guest-shutdown" : "host-request";
      else if (e.event === "RESET") this.emit("reset");
      else if (e.event === "STOP") this.emit("stop");
      else if (e.event === "RESUME") this.emit("resume");
    });
    this.#exit = new Promise((resolve) => {
      qmp.once("close", () => {
        void (async () => {
          // The monitor closes when QEMU exits; wait for the process to be gone too.
          for (let i = 0; i < 100 && alive(this.pid); i++) await delay(20);
          if (!this.#detached) this.emit("exit", this.#cause);
          resolve(this.#cause);
        })();
      });
    });
  }

  static async connect(paths: VmPaths, pid: number): Promise<QemuVmm | undefined> {
    let lastErr: unknown;
    // Up to 10 s: a loaded host may be slow to let QEMU answer its first monitor connection.
    for (let i = 0; i < 200; i++) {
      if (!alive(pid)) return undefined;
      try {
        return new QemuVmm(pid, await QmpClient.connect(paths.control, { timeoutMs: 5000 }));
      } catch (e) {
        lastErr = e;
        await delay(50);
      }
    }
    throw new Error(`cannot reach QEMU ${pid} over QMP: ${(lastErr as Error)?.message}`);
  }

  async status(): Promise<"running" | "paused"> {
    const s = await this.qmp.execute<{ running: boolean; status: string }>("query-status");
    return s.running ? "running" : "paused";
  }
  async pause() {
    await this.qmp.execute("stop");
  }
  async resume() {
    await this.qmp.execute("cont");
  }
  async reset() {
    await this.qmp.execute("system_reset");
  }
  async powerdown() {
    await this.qmp.execute("system_powerdown");
  }
  async kill(): Promise<void> {
    this.#cause = "host-request";
    try {
      await this.qmp.execute("quit", undefined, { timeoutMs: 3000 });
    } catch {
      // the monitor went away, or QEMU is stuck: the signal below settles it
    }
    const gone = await Promise.race([this.#exit.then(() => true), delay(3000).then(() => false)]);
    if (!gone && alive(this.pid)) {
      process.kill(this.pid, "SIGKILL");
      await this.#exit;
    }
  }
  async saveState(socketPath: string, signal?: AbortSignal): Promise<void> {
    // Local saves need not be throttled like a migration over a network.
    await this.qmp.execute("migrate-set-parameters", { "max-bandwidth": 8 * 1024 ** 3 });
    await this.qmp.execute("migrate", { uri: `unix:${socketPath}` });
    for (;;) {
      signal?.throwIfAborted();
      const m = await this.qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      if (m.status === "completed") return;
      if (m.status === "failed" || m.status === "cancelled") {
        throw new Error(`saving the VM state failed: ${m["error-desc"] ?? m.status}`);
      }
      await delay(50);
    }
  }
  async incomingDone(signal?: AbortSignal): Promise<void> {
    for (;;) {
      signal?.throwIfAborted();
      const s = await this.qmp.execute<{ status: string }>("query-status");
      if (s.status !== "inmigrate") {
        if (s.status !== "paused" && s.status !== "running")
          throw new Error(`loading the VM state failed: QEMU is ${s.status}`);
        return;
      }
      await delay(50);
    }
  }
  async attachDisk(disk: AttachedDisk): Promise<void> {
    const ex = exportedDiskObjects(disk);
    if (ex) {
      // A storage daemon serves it: a vhost-user-blk device on a chardev, or virtio-blk on an NBD node.
      const undo =
        ex.kind === "vhost-user-blk"
          ? await this.qmp
              .execute("chardev-add", ex.chardev)
              .then(() => () => this.qmp.execute("chardev-remove", { id: ex.chardev.id }))
          : await this.qmp
              .execute("blockdev-add", ex.node)
              .then(() => () => this.qmp.execute("blockdev-del", { "node-name": ex.node["node-name"] }));
      try {
        await this.qmp.execute("device_add", ex.device);
      } catch (e) {
        await undo().catch(() => undefined);
        throw e;
      }
      return;
    }
    const o = diskObjects(disk);
    const undo: (() => Promise<unknown>)[] = [];
    try {
      await this.qmp.execute("blockdev-add", o.file);
      undo.push(() => this.qmp.execute("blockdev-del", { "node-name": `f-${disk.id}` }));
      await this.qmp.execute("blockdev-add", o.format);
      undo.push(() => this.qmp.execute("blockdev-del", { "node-name": `d-${disk.id}` }));
      await this.qmp.execute("device_add", o.device);
    } catch (e) {
      for (const u of undo.reverse()) await u().catch(() => undefined);
      throw e;
    }
  }
  async attachGpu(gpu: AttachedGpu): Promise<void> {
    await hotplugGpu((c, a) => this.qmp.execute(c, a), gpu);
  }
  async detachGpu(id: string, timeoutMs: number): Promise<void> {
    // Unplugging function 0 takes the whole slot (its other functions too) out of the guest.
    await this.#unplug(`gpu-${id}`, timeoutMs);
  }
  async attachNic(nic: AttachedNic): Promise<void> {
    await this.qmp.execute("netdev_add", {
      type: "tap",
      id: `n-${nic.id}`,
      ifname: nic.tap,
      script: "no",
      downscript: "no",
    });
    try {
      await this.qmp.execute("device_add", {
        driver: "virtio-net-pci",
        id: `nic-${nic.id}`,
        netdev: `n-${nic.id}`,
        mac: nic.mac,
        bus: `rp${nic.slot}`,
      });
    } catch (e) {
      await this.qmp.execute("netdev_del", { id: `n-${nic.id}` }).catch(() => undefined);
      throw e;
    }
  }
  async detachNic(id: string, timeoutMs: number): Promise<void> {
    await this.#unplug(`nic-${id}`, timeoutMs);
    await this.qmp.execute("netdev_del", { id: `n-${id}` });
  }
  /** device_del, then wait until the guest has released the device. */
  async #unplug(device: string, timeoutMs: number): Promise<void> {
    const gone = new Promise<boolean>((resolve) => {
      const t = setTimeout(() => {
        this.qmp.off("event", onEvent);
        resolve(false);
      }, timeoutMs);
      const onEvent = (e: QmpEvent) => {
        if (e.event === "DEVICE_DELETED" && e.data.device === device) {
          clearTimeout(t);
          this.qmp.off("event", onEvent);
          resolve(true);
        }
      };
      this.qmp.on("event", onEvent);
    });
    await this.qmp.execute("device_del", { id: device });
    if (!(await gone)) throw new Error(`the guest did not release ${device} within ${timeoutMs} ms`);
  }
  async detachDisk(id: string, timeoutMs: number): Promise<void> {
    await this.#unplug(`disk-${id}`, timeoutMs);
    // What the disk was made of: a format node on a file node (a plain file), an NBD node alone, or a
    // chardev (vhost-user-blk). Whatever is absent answers "not found", which is fine here.
    const absent = (e: unknown) => {
      if (!(e instanceof QmpError) || !/not found|cannot find|failed to find/i.test(e.message)) throw e;
    };
    await this.qmp.execute("blockdev-del", { "node-name": `d-${id}` }).catch(absent);
    await this.qmp.execute("blockdev-del", { "node-name": `f-${id}` }).catch(absent);
    await this.qmp.execute("chardev-remove", { id: `c-${id}` }).catch(absent);
  }
  async hotplugVcpus(total: number): Promise<void> {
    type Slot = { type: string; "qom-path"?: string; props: Record<string, number> };
    const slots = await this.qmp.execute<Slot[]>("query-hotpluggable-cpus");
    const plugged = slots.filter((x) => x["qom-path"] !== undefined).length;
    const free = slots.filter((x) => x["qom-path"] === undefined).reverse(); // QEMU lists the highest first
    for (let n = plugged; n < total; n++) {
      const slot = free.shift();
      if (!slot) throw new Error(`no free vCPU slot for vCPU ${n}`);
      const id = `vcpu-${Object.values(slot.props).join("-")}`;
      await this.qmp.execute("device_add", { driver: slot.type, id, ...slot.props });
    }
  }
  async hotplugMemory(bytes: bigint): Promise<void> {
    const n = `${Date.now().toString(36)}`;
    await this.qmp.execute("object-add", {
      // Shared like the boot memory (vhost-user backends map all of the guest's RAM).
      "qom-type": "memory-backend-memfd",
      id: `mem-${n}`,
      size: Number(bytes),
      share: true,
    });
    try {
      await this.qmp.execute("device_add", { driver: "pc-dimm", id: `dimm-${n}`, memdev: `mem-${n}` });
    } catch (e) {
      await this.qmp.execute("object-del", { id: `mem-${n}` }).catch(() => undefined);
      throw e;
    }
  }
  exited(): Promise<ExitCause> {
    return this.#exit;
  }
  detach(): void {
    this.#detached = true;
    this.qmp.close();
  }
  passthrough(command: string, args: Record<string, unknown> | undefined): Promise<unknown> {
    return this.qmp.execute(command, args);
  }
  migration(): QemuMigration {
    return new QemuMigration(this.qmp);
  }
  async counters(): Promise<VmmCounters> {
    const [cpus, blocks, balloon] = await Promise.all([
      this.qmp.execute<QmpCpu[]>("query-cpus-fast"),
      this.qmp.execute<QmpBlockStats[]>("query-blockstats"),
      // No balloon device: QEMU answers DeviceNotActive, and the VM has no balloon to report.
      this.qmp.execute<QmpBalloon>("query-balloon").catch(() => undefined),
    ]);
    return qemuCounters(cpus, blocks, balloon);
  }
}
