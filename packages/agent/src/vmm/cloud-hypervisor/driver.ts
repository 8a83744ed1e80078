/**
 * The cloud-hypervisor driver: one detached `cloud-hypervisor` process per VM, driven over its REST API
 * socket, watched through its pid and its event monitor file. See README.md for the choices (serial
 * console relay, paused start, exit cause) and for what is proven only against the fake VMM.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { EventEmitter } from "node:events";
import { open, rm, stat, writeFile } from "node:fs/promises";
import { StringDecoder } from "node:string_decoder";
import { setTimeout as delay } from "node:timers/promises";
import { type ErrorCode, invalidArgument, unimplemented, VmenvError } from "@vmenv/rpc/errors";
import type {
  AttachedDisk,
  AttachedNic,
  ExitCause,
  LaunchRequest,
  RunningVmm,
  VmmCounters,
  VmmDriver,
  VmPaths,
} from "../driver.js";
import { alive, killHard, waitGone } from "../process.js";
import { type CallOptions, CloudHypervisorClient } from "./api.js";
import { type ChFiles, chArgs, chFiles, chLaunchSpec, startFailed, vmName } from "./cmdline.js";
import { buildDiskConfig, buildNetConfig, buildResize, buildVmConfig, ChConfigError } from "./config.js";
import { CloudHypervisorApiError, CloudHypervisorError, CloudHypervisorUnreachableError } from "./errors.js";
import { type ChEvent, exitCauseOf, parseChEvents, vmmSignalOf } from "./events.js";
import { SerialRelay } from "./serial-relay.js";
import type { VmConfig, VmResize } from "./types.js";

export interface CloudHypervisorDriverOptions {
  /** The `cloud-hypervisor` binary; undefined when none was found. */
  binary: () => Promise<string | undefined>;
  /** How long a new VMM may take to answer on its API socket. Default 10 s. */
  startTimeoutMs?: number;
  /** How often a running VMM's pid and event file are looked at. Default 100 ms. */
  pollMs?: number;
  /** How long `kill()` waits for `vmm.shutdown` to end the process before SIGKILL. Default 3 s. */
  killGraceMs?: number;
}

interface Timing {
  pollMs: number;
  killGraceMs: number;
}

/** Endpoints that are read with GET; every other endpoint of the API is a PUT. */
const GET_ENDPOINTS: ReadonlySet<string> = new Set(["vm.info", "vm.counters", "vmm.ping"]);
/** Passthrough commands after which the VMM ends because the agent's caller asked. */
const ENDING_ENDPOINTS: ReadonlySet<string> = new Set(["vmm.shutdown", "vm.send-migration"]);

export class CloudHypervisorDriver implements VmmDriver {
  readonly kind = "cloud-hypervisor" as const;
  readonly #opts: CloudHypervisorDriverOptions;
  readonly #timing: Timing;

  constructor(opts: CloudHypervisorDriverOptions) {
    this.#opts = opts;
    this.#timing = { pollMs: opts.pollMs ?? 100, killGraceMs: opts.killGraceMs ?? 3000 };
  }

  async availability() {
    return (await this.#opts.binary())
      ? ({ available: true } as const)
      : ({ available: false, reason: "cloud-hypervisor not found on PATH" } as const);
  }

  /**
   * Starts an empty VMM detached (its own session, no stdin, stdout and stderr to
   * `cloud-hypervisor.log`), writes its pid file, waits for its API, then `vm.create` and, unless the
   * start is paused, `vm.boot`. A paused start creates the VM without booting it: no vCPU has run, and
   * `resume()` boots it. Any failure after the spawn ends the process again.
   */
  async launch(req: LaunchRequest, signal?: AbortSignal): Promise<RunningVmm> {
    const vm = `vms/${req.id}`;
    const binary = await this.#opts.binary();
    if (!binary) {
      throw new VmenvError("failed-precondition", `cloud-hypervisor is not available on this host (${vm})`, {
        reason: "VMM_UNAVAILABLE",
        metadata: { vmm: "cloud-hypervisor", vm },
      });
    }
    if ((req as { incoming?: string }).incoming !== undefined) {
      throw unimplemented(
        "starting a cloud-hypervisor VM from saved state",
        `${vm}: the driver has no state transfer yet`,
      );
    }
    const files = chFiles(req.paths);
    const args = chArgs(vm, files);
    let config: VmConfig;
    try {
      config = buildVmConfig(chLaunchSpec(req, files));
    } catch (e) {
      if (e instanceof ChConfigError) throw startFailed(vm, e.message, e);
      throw e;
    }
    signal?.throwIfAborted();

    // Measure, then act: a VMM that still answers on the API socket is not replaced (removing its socket
    // would orphan it); the files of a previous run go (the VMM would refuse a stale serial socket).
    const { paths } = req;
    if (await answers(files.apiSocket)) {
      throw startFailed(vm, `a cloud-hypervisor process still serves its API socket ${files.apiSocket}`);
    }
    await Promise.all(
      [files.apiSocket, files.vmmSerialSocket, paths.serialSocket, paths.pidFile].map((p) =>
        rm(p, { force: true }),
      ),
    );
    const logOffset = await stat(files.log).then(
      (s) => s.size,
      () => 0,
    );
    const child = await spawnDetached(binary, args, files.log, paths.dir).catch((e: Error) => {
      throw startFailed(vm, `cannot run ${binary}: ${e.message}`, e);
    });
    const pid = child.pid as number;
    const client = new CloudHypervisorClient({ socketPath: files.apiSocket });
    const ended = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    const whyEnded = async () => {
      // The process may be gone (a zombie) before Node has reaped it and read its status.
      await Promise.race([ended, delay(1000)]);
      const how =
        child.exitCode !== null
          ? `exit status ${child.exitCode}`
          : child.signalCode !== null
            ? `signal ${child.signalCode}`
            : "status unknown";
      const said = await logSince(files.log, logOffset);
      return `the process ended (${how})${said ? `: ${said}` : ""}`;
    };
    try {
      await writeFile(paths.pidFile, `${pid}\n`);
      await this.#waitForApi(vm, client, pid, whyEnded, signal);
      await client.create(config, { signal });
      if (!req.paused) await client.boot({ signal });
      return await CloudHypervisorVmm.attach(vm, pid, client, files, paths, this.#timing);
    } catch (err) {
      const endedAlone = !alive(pid);
      await abandon(client, pid, this.#timing.killGraceMs);
      await rm(paths.pidFile, { force: true });
      if (signal?.aborted) throw signal.reason;
      if (err instanceof VmenvError) throw err;
      if (err instanceof CloudHypervisorApiError) {
        const step = err.endpoint.endsWith("vm.create") ? "vm.create" : "vm.boot";
        throw startFailed(vm, `${step} was refused: ${err.body.trim() || `HTTP ${err.status}`}`, err);
      }
      if (endedAlone) throw startFailed(vm, await whyEnded(), err);
      throw startFailed(vm, (err as Error).message, err);
    }
  }

  async #waitForApi(
    vm: string,
    client: CloudHypervisorClient,
    pid: number,
    whyEnded: () => Promise<string>,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const limit = this.#opts.startTimeoutMs ?? 10_000;
    const deadline = Date.now() + limit;
    for (;;) {
      signal?.throwIfAborted();
      if (!alive(pid)) throw startFailed(vm, await whyEnded());
      try {
        await client.ping({ timeoutMs: 1000, ...(signal ? { signal } : {}) });
        return;
      } catch (e) {
        if (signal?.aborted) throw signal.reason;
        if (!(e instanceof CloudHypervisorError)) throw e;
      }
      if (Date.now() >= deadline) {
        throw startFailed(vm, `its API socket did not answer within ${limit} ms`);
      }
      await delay(25);
    }
  }

  /**
   * Takes over a VMM a previous agent started: it must run (a zombie does not), answer `vmm.ping` on the
   * VM's API socket — with this pid, when the VMM reports its pid, so that a reused pid is not mistaken
   * for it — and hold a VM (`vm.info`). A VMM that answers but holds no VM is what a launch cut short
   * leaves behind: it is shut down, and there is nothing to adopt.
   */
  async adopt(paths: VmPaths, pid: number): Promise<RunningVmm | undefined> {
    if (!alive(pid)) return undefined;
    const files = chFiles(paths);
    const client = new CloudHypervisorClient({ socketPath: files.apiSocket, timeoutMs: 5000 });
    let reportedPid: number | undefined;
    try {
      reportedPid = (await client.ping()).pid;
    } catch {
      return undefined;
    }
    if (reportedPid !== undefined && reportedPid !== pid) return undefined;
    try {
      await client.info();
    } catch (e) {
      if (e instanceof CloudHypervisorApiError) {
        await abandon(client, reportedPid === pid ? pid : undefined, this.#timing.killGraceMs);
      }
      return undefined;
    }
    return CloudHypervisorVmm.attach(vmName(paths), pid, client, files, paths, this.#timing);
  }
}

/**
 * Ends a VMM the agent gives up on: `vmm.shutdown`, then SIGKILL when its pid is known for sure (the
 * agent started it, or its ping reported it).
 */
async function abandon(
  client: CloudHypervisorClient,
  pid: number | undefined,
  graceMs: number,
): Promise<void> {
  if (pid !== undefined && !alive(pid)) return;
  await client.vmmShutdown({ timeoutMs: graceMs }).catch(() => undefined);
  if (pid !== undefined && !(await waitGone(pid, graceMs))) {
    killHard(pid);
    await waitGone(pid, 5000);
  }
}

/** Whether something serves the API socket: it answers, or accepts and stays silent (a VMM busy). */
async function answers(socketPath: string): Promise<boolean> {
  try {
    await new CloudHypervisorClient({ socketPath }).ping({ timeoutMs: 1000 });
    return true;
  } catch (e) {
    return !(e instanceof CloudHypervisorUnreachableError);
  }
}

/**
 * Spawns the VMM in its own session so that it outlives the agent, with stdout and stderr appended to
 * `logPath`; resolves once it runs.
 */
async function spawnDetached(
  binary: string,
  args: string[],
  logPath: string,
  cwd: string,
): Promise<ChildProcess> {
  const log = await open(logPath, "a");
  try {
    const child = spawn(binary, args, { detached: true, stdio: ["ignore", log.fd, log.fd], cwd });
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", reject);
    });
    child.unref();
    return child;
  } finally {
    await log.close();
  }
}

/** What the VMM printed since `offset`: from its last "Error:" line, or its last lines, on one line. */
async function logSince(path: string, offset: number): Promise<string> {
  let text = "";
  try {
    const fh = await open(path, "r");
    try {
      const size = (await fh.stat()).size;
      const start = Math.max(offset, size - 16384);
      const buf = Buffer.alloc(Math.max(0, size - start));
      await fh.read(buf, 0, buf.length, start);
      text = buf.toString("utf8");
    } finally {
      await fh.close();
    }
  } catch {
    return "";
  }
  const lines = text
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "");
  const from = lines.findLastIndex((l) => l.startsWith("Error:"));
  const picked = from >= 0 ? lines.slice(from) : lines.slice(-5);
  const one = picked.join(" ");
  return one.length > 600 ? `${one.slice(0, 600)}…` : one;
}

class CloudHypervisorVmm
  extends EventEmitter<{ exit: [ExitCause]; reset: []; stop: []; resume: [] }>
  implements RunningVmm
{
  readonly #vm: string;
  readonly #client: CloudHypervisorClient;
  readonly #files: ChFiles;
  readonly #relay: SerialRelay;
  readonly #timing: Timing;
  readonly #exit: Promise<ExitCause>;
  #resolveExit: (cause: ExitCause) => void = () => undefined;
  /** Every event of this VMM's run, and how many of them have been acted on. */
  readonly #events: ChEvent[] = [];
  #seen = 0;
  #eventOffset = 0;
  #eventRest = "";
  #decoder = new StringDecoder("utf8");
  #hostRequested = false;
  #detached = false;
  #gone = false;
  #timer: NodeJS.Timeout | undefined;

  private constructor(
    readonly pid: number,
    vm: string,
    client: CloudHypervisorClient,
    files: ChFiles,
    relay: SerialRelay,
    timing: Timing,
  ) {
    super();
    this.#vm = vm;
    this.#client = client;
    this.#files = files;
    this.#relay = relay;
    this.#timing = timing;
    this.#exit = new Promise((resolve) => {
      this.#resolveExit = resolve;
    });
  }

  /** Starts the console relay and the watch on the pid and the events (those already written are past). */
  static async attach(
    vm: string,
    pid: number,
    client: CloudHypervisorClient,
    files: ChFiles,
    paths: VmPaths,
    timing: Timing,
  ): Promise<CloudHypervisorVmm> {
    const relay = await SerialRelay.start({
      vmmSocket: files.vmmSerialSocket,
      clientSocket: paths.serialSocket,
      logFile: paths.serialLog,
    });
    const vmm = new CloudHypervisorVmm(pid, vm, client, files, relay, timing);
    await vmm.#readEvents();
    vmm.#seen = vmm.#events.length;
    vmm.#schedule();
    return vmm;
  }

  #schedule(): void {
    if (this.#detached || this.#gone) return;
    this.#timer = setTimeout(() => void this.#tick(), this.#timing.pollMs);
  }

  async #tick(): Promise<void> {
    // Look at the pid first: events written before the process ended are then all in the file.
    const gone = !alive(this.pid);
    await this.#readEvents();
    if (this.#detached) return;
    for (; this.#seen < this.#events.length; this.#seen++) {
      const e = this.#events[this.#seen];
      const signal = e && vmmSignalOf(e);
      if (signal) this.emit(signal);
    }
    if (!gone) {
      this.#schedule();
      return;
    }
    this.#gone = true;
    const cause = exitCauseOf(this.#events, this.#hostRequested);
    await this.#relay.close().catch(() => undefined);
    this.emit("exit", cause);
    this.#resolveExit(cause);
  }

  /** Reads what the VMM appended to its event file since the last look. */
  async #readEvents(): Promise<void> {
    let fh: Awaited<ReturnType<typeof open>>;
    try {
      fh = await open(this.#files.events, "r");
    } catch {
      return; // not written yet, or removed
    }
    try {
      const { size } = await fh.stat();
      if (size < this.#eventOffset) {
        // Truncated: a VMM started anew on this file. Its events are the ones that count.
        this.#eventOffset = 0;
        this.#eventRest = "";
        this.#decoder = new StringDecoder("utf8");
        this.#events.length = 0;
        this.#seen = 0;
      }
      let text = "";
      const buf = Buffer.alloc(65536);
      while (this.#eventOffset < size) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, this.#eventOffset);
        if (bytesRead === 0) break;
        this.#eventOffset += bytesRead;
        text += this.#decoder.write(buf.subarray(0, bytesRead));
      }
      if (text === "") return;
      const { events, rest } = parseChEvents(this.#eventRest + text);
      this.#events.push(...events);
      this.#eventRest = rest;
    } catch {
      // a read that fails is tried again on the next look
    } finally {
      await fh.close();
    }
  }

  async #api<T>(what: string, call: (o: CallOptions) => Promise<T>, refused?: ErrorCode): Promise<T> {
    try {
      return await call({});
    } catch (err) {
      throw this.#mapError(what, err, refused);
    }
  }

  #mapError(what: string, err: unknown, refused: ErrorCode = "failed-precondition"): unknown {
    const vm = this.#vm;
    if (err instanceof CloudHypervisorApiError) {
      return new VmenvError(
        refused,
        `cloud-hypervisor of ${vm} refused ${what}: ${err.body.trim() || `HTTP ${err.status}`}`,
        {
          reason: "VMM_REFUSED",
          metadata: { vm, endpoint: err.endpoint, status: String(err.status) },
          cause: err,
        },
      );
    }
    if (err instanceof CloudHypervisorError) {
      return new VmenvError(
        "unavailable",
        `cloud-hypervisor of ${vm} did not answer ${what}: ${err.message}`,
        {
          reason: "VMM_UNAVAILABLE",
          metadata: { vm, vmm: "cloud-hypervisor" },
          cause: err,
        },
      );
    }
    return err;
  }

  /** "running" when the VM runs; "paused" when its vCPUs do not (paused, created but not booted, shut down). */
  async status(): Promise<"running" | "paused"> {
    const info = await this.#api("vm.info", (o) => this.#client.info(o));
    return info.state === "Running" ? "running" : "paused";
  }

  async pause(): Promise<void> {
    await this.#api("vm.pause", (o) => this.#client.pause(o));
  }

  /** Resumes a paused VM; boots one that was created paused (or shut down inside its VMM). */
  async resume(): Promise<void> {
    const info = await this.#api("vm.info", (o) => this.#client.info(o));
    if (info.state === "Created" || info.state === "Shutdown") {
      await this.#api("vm.boot", (o) => this.#client.boot(o));
    } else {
      await this.#api("vm.resume", (o) => this.#client.resume(o));
    }
  }

  async reset(): Promise<void> {
    await this.#api("vm.reboot", (o) => this.#client.reboot(o));
  }

  async powerdown(): Promise<void> {
    await this.#api("vm.power-button", (o) => this.#client.powerButton(o));
  }

  /** `vmm.shutdown`; SIGKILL when the process is still there after the grace time. */
  async kill(): Promise<void> {
    this.#hostRequested = true;
    const grace = this.#timing.killGraceMs;
    if (alive(this.pid)) {
      await this.#client.vmmShutdown({ timeoutMs: grace }).catch(() => undefined);
      if (!(await waitGone(this.pid, grace))) {
        killHard(this.pid);
        await waitGone(this.pid, 10_000);
      }
    }
    if (!this.#detached) await this.#exit;
  }

  /** Resolves when the process is gone. After `detach()` nothing watches it: it then settles only if it had. */
  exited(): Promise<ExitCause> {
    return this.#exit;
  }

  /** Stops watching and relaying the console; the VMM runs on, and the next agent adopts it. */
  detach(): void {
    this.#detached = true;
    clearTimeout(this.#timer);
    void this.#relay.close();
  }

  /** `vm.resize` to `total` vCPUs. */
  /** `vm.add-disk`; the VMM picks the PCI slot (no root ports to choose from). */
  async attachDisk(disk: AttachedDisk): Promise<void> {
    const body = buildDiskConfig({
      id: disk.id,
      path: disk.path,
      format: disk.format,
      readOnly: disk.readOnly,
      ...(disk.serial ? { serial: disk.serial } : {}),
    });
    await this.#api("vm.add-disk", (o) => this.#client.addDisk(body, o));
  }

  /** `vm.add-net` on the NIC's tap. */
  async attachNic(nic: AttachedNic): Promise<void> {
    const body = buildNetConfig({ id: nic.id, tap: nic.tap, mac: nic.mac });
    await this.#api("vm.add-net", (o) => this.#client.addNet(body, o));
  }

  async detachNic(id: string, timeoutMs: number): Promise<void> {
    await this.detachDisk(id, timeoutMs);
  }

  /** `vm.remove-device`; cloud-hypervisor answers once the guest has ejected it. */
  async detachDisk(id: string, timeoutMs: number): Promise<void> {
    await this.#api("vm.remove-device", (o) => this.#client.removeDevice({ id }, { ...o, timeoutMs }));
  }

  async hotplugVcpus(total: number): Promise<void> {
    const body = buildResize({ vcpus: total });
    await this.#api("vm.resize", (o) => this.#client.resize(body, o));
  }

  /** `vm.resize` to the memory plugged now (`vm.info`'s `memory_actual_size`) plus `bytes`. */
  async hotplugMemory(bytes: bigint): Promise<void> {
    const info = await this.#api("vm.info", (o) => this.#client.info(o));
    const now = info.memory_actual_size ?? info.config.memory?.size ?? 0;
    let body: VmResize;
    try {
      body = buildResize({ memoryBytes: BigInt(now) + bytes });
    } catch (e) {
      if (e instanceof ChConfigError) throw invalidArgument("memory_bytes", e.message);
      throw e;
    }
    await this.#api("vm.resize", (o) => this.#client.resize(body, o));
  }

  saveState(_socketPath: string, _signal?: AbortSignal): Promise<void> {
    return Promise.reject(
      unimplemented(
        "saving the state of a cloud-hypervisor VM",
        `${this.#vm}: the driver has no state transfer yet`,
      ),
    );
  }

  incomingDone(_signal?: AbortSignal): Promise<void> {
    return Promise.reject(
      unimplemented(
        "starting a cloud-hypervisor VM from saved state",
        `${this.#vm}: the driver has no state transfer yet`,
      ),
    );
  }

  /**
   * A raw API call: `command` is the endpoint (`vm.info`, `vm.counters`, `vmm.ping` are read with GET,
   * every other endpoint is a PUT; `GET vm.x`/`PUT vm.x` chooses), `args` its JSON body. Answers the JSON
   * the VMM sent, or undefined.
   */
  async passthrough(command: string, args: Record<string, unknown> | undefined): Promise<unknown> {
    const m = /^(?:(GET|PUT)\s+)?\/?(vmm?\.[a-z][a-z0-9-]*)$/.exec(command.trim());
    const endpoint = m?.[2];
    if (!m || endpoint === undefined) {
      throw invalidArgument(
        "command",
        `${JSON.stringify(command.slice(0, 80))} is not a cloud-hypervisor API endpoint (e.g. vm.info, vm.counters, vmm.ping)`,
      );
    }
    const method = (m[1] as "GET" | "PUT" | undefined) ?? (GET_ENDPOINTS.has(endpoint) ? "GET" : "PUT");
    if (ENDING_ENDPOINTS.has(endpoint)) this.#hostRequested = true;
    // A GET has no body; an empty object is what a caller sends for "no arguments".
    const body = method === "GET" || args === undefined || Object.keys(args).length === 0 ? undefined : args;
    return this.#api(endpoint, (o) => this.#client.raw(method, `/${endpoint}`, body, o), "invalid-argument");
  }

  /**
   * `vm.counters`: per-disk bytes and requests (keyed by the disk's id). cloud-hypervisor names no vCPU
   * threads and reports no balloon here: statistics find its `vcpuN` threads themselves.
   */
  async counters(): Promise<VmmCounters> {
    const all = await this.#api("vm.counters", (o) => this.#client.counters(o));
    const disks: VmmCounters["disks"] = {};
    for (const [id, c] of Object.entries(all)) {
      if (c.read_bytes === undefined && c.write_bytes === undefined) continue; // a NIC: tap counters say more
      disks[id] = {
        readBytes: c.read_bytes ?? 0,
        writeBytes: c.write_bytes ?? 0,
        readOps: c.read_ops ?? 0,
        writeOps: c.write_ops ?? 0,
        flushOps: 0,
        readTimeNs: 0,
        writeTimeNs: 0,
      };
    }
    return { vcpuThreads: [], balloon: undefined, disks };
  }
}
