/**
 * Test helper: a stand-in for a cloud-hypervisor process's API socket, for tests on machines where the
 * VMM cannot run. An HTTP server on a Unix socket in a fresh temporary folder that
 *
 * - records every request (method, path, headers, parsed JSON body, the status it answered);
 * - checks each request against the published OpenAPI document (path and method documented, body valid
 *   with unknown fields rejected) and answers 400 with a plain-text reason when it is not, as the VMM
 *   answers a body it cannot parse;
 * - keeps one VM through Created → Running ⇄ Paused → Shutdown (→ Running again), with devices added and
 *   removed, resizes, snapshots and restores, and answers with the statuses the document declares for
 *   each case and a `vm.info` body valid against `VmInfo`;
 * - checks its own answers against the document too, so a fake that drifted from the contract fails the
 *   tests that use it (`violations`).
 *
 * It does not boot anything: no guest, no devices, no files written. See README.md for what that leaves
 * unproven.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type IncomingHttpHeaders, type Server, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import type { VmConfig, VmState } from "../types.js";
import { type ChOpenApi, loadChOpenApi } from "./openapi.js";

export interface RecordedRequest {
  method: string;
  /** Path below `/api/v1`, e.g. `/vm.create`. */
  path: string;
  headers: IncomingHttpHeaders;
  /** The parsed JSON body; undefined when there was none. */
  body: unknown;
  /** Status the fake answered; undefined while the request is held or was never answered. */
  status?: number;
}

/** Something the client sent, or the fake answered, that the document does not allow. */
export interface ContractViolation {
  method: string;
  path: string;
  side: "request" | "response";
  problems: string[];
}

/** The VM the fake holds. `config` is what was created, with devices added/removed and resizes applied. */
export interface FakeVm {
  state: VmState;
  config: FakeVmConfig;
  memoryActualSize: number;
}

type FakeVmConfig = VmConfig & { memory?: { hotplugged_size?: number } };

export interface FakeChApiOptions {
  /** Config the VM gets when a migration is received. Default: no VM appears (the receive still succeeds). */
  incomingConfig?: VmConfig;
  /**
   * Listen here instead of in a new temporary folder (the fake `cloud-hypervisor` binary's
   * `--api-socket`). `close()` then removes the socket only.
   */
  socketPath?: string;
  /**
   * Called for a request that is valid for the document, before the fake acts on it: an answer returned
   * here is sent instead (a refusal the VMM process would make, e.g. a socket it cannot bind).
   */
  intercept?: (path: string, body: Record<string, unknown> | undefined) => Answer | undefined;
  /**
   * Called for every request once the fake has decided on it, before its answer is written (as the VMM
   * acts before it answers): the request as recorded, its status set, and a promise that resolves once
   * the answer has been written. A held request comes with no status and `sent` undefined.
   */
  onRequest?: (request: RecordedRequest, sent: Promise<void> | undefined) => void;
}

export interface Answer {
  status: number;
  json?: unknown;
  text?: string;
  /** After answering, stop listening, as the VMM process exits. */
  exit?: boolean;
}

const DEFAULT_MEMORY = 512 * 1024 * 1024;

export class FakeChApi {
  readonly dir: string;
  readonly socketPath: string;
  readonly requests: RecordedRequest[] = [];
  readonly violations: ContractViolation[] = [];
  /** Snapshots taken: destination URL → config at the time. */
  readonly snapshots = new Map<string, FakeVmConfig>();
  vm: FakeVm | undefined;
  /** Whether the fake VMM has "exited" (vmm.shutdown, or a completed outgoing migration). */
  exited = false;

  readonly #openApi: ChOpenApi;
  readonly #server: Server;
  readonly #options: FakeChApiOptions;
  readonly #ownsDir: boolean;
  readonly #failures = new Map<string, { status: number; text: string }>();
  readonly #holds = new Set<string>();
  readonly #waiters: { path: string; resolve: (r: RecordedRequest) => void }[] = [];
  #nextSlot = 6;
  #nextAutoId = 0;

  private constructor(dir: string | undefined, openApi: ChOpenApi, options: FakeChApiOptions) {
    this.#ownsDir = dir !== undefined;
    this.socketPath = options.socketPath ?? join(dir ?? ".", "api.sock");
    this.dir = dir ?? dirname(this.socketPath);
    this.#openApi = openApi;
    this.#options = options;
    this.#server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () =>
        this.#handle(req.method ?? "", req.url ?? "", req.headers, Buffer.concat(chunks), res),
      );
    });
  }

  /**
   * Starts a fake on a socket in a new temporary folder (or on `options.socketPath`). Call `close()` (in
   * `afterEach`) to remove both.
   */
  static async start(options: FakeChApiOptions = {}): Promise<FakeChApi> {
    const openApi = loadChOpenApi();
    const dir =
      options.socketPath === undefined ? await mkdtemp(join(tmpdir(), "vmenv-ch-fake-")) : undefined;
    const fake = new FakeChApi(dir, openApi, options);
    try {
      await new Promise<void>((resolve, reject) => {
        fake.#server.once("error", reject);
        fake.#server.listen(fake.socketPath, () => {
          fake.#server.off("error", reject);
          resolve();
        });
      });
    } catch (err) {
      if (dir !== undefined) await rm(dir, { recursive: true, force: true });
      throw err;
    }
    return fake;
  }

  /** The next request to `path` is answered with `status` and a plain-text body, whatever the state. */
  failNext(path: string, status: number, text: string): void {
    this.#failures.set(path, { status, text });
  }

  /** The next request to `path` is read and recorded but never answered (until `close()`). */
  holdNext(path: string): void {
    this.#holds.add(path);
  }

  /** Resolves when a request to `path` arrives (one that arrived before the call does not count). */
  nextRequest(path: string): Promise<RecordedRequest> {
    return new Promise((resolve) => this.#waiters.push({ path, resolve }));
  }

  /** Paths of the recorded requests, as `METHOD /path`. */
  calls(): string[] {
    return this.requests.map((r) => `${r.method} ${r.path}`);
  }

  /**
   * Stops the server, cuts open connections and removes the temporary folder (or the socket given as
   * `socketPath`). Safe to call twice.
   */
  async close(): Promise<void> {
    await this.#stopListening();
    this.#server.closeAllConnections();
    await rm(this.#ownsDir ? this.dir : this.socketPath, { recursive: true, force: true });
  }

  #stopListening(): Promise<void> {
    if (!this.#server.listening) return Promise.resolve();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }

  #handle(method: string, url: string, headers: IncomingHttpHeaders, raw: Buffer, res: ServerResponse): void {
    const base = this.#openApi.basePath;
    const path = url.startsWith(`${base}/`) ? url.slice(base.length) : url;
    const record: RecordedRequest = { method, path, headers, body: undefined };
    this.requests.push(record);
    const send = (answer: Answer): void => {
      record.status = answer.status;
      const sent = new Promise<void>((resolve) => res.once("close", resolve));
      this.#options.onRequest?.(record, sent);
      this.#answer(method, path, answer, res);
    };

    let body: unknown;
    if (raw.length > 0) {
      try {
        body = JSON.parse(raw.toString("utf8"));
        record.body = body;
      } catch {
        this.#violation(method, path, "request", ["body is not JSON"]);
        send({ status: 400, text: "Error from API: the request body could not be parsed as JSON" });
        return;
      }
    }
    for (const [i, waiter] of [...this.#waiters.entries()].reverse()) {
      if (waiter.path === path) {
        this.#waiters.splice(i, 1);
        waiter.resolve(record);
      }
    }

    if (!url.startsWith(`${base}/`)) {
      send({ status: 404, text: `unknown path ${url}` });
      return;
    }
    const op = this.#openApi.operation(method, path);
    if (op === undefined) {
      this.#violation(method, path, "request", [`${method} ${path} is not in the document`]);
      const known = ["get", "put", "post", "delete", "patch"].some((m) => this.#openApi.operation(m, path));
      send({ status: known ? 405 : 404, text: `${method} ${path} is not an API endpoint` });
      return;
    }
    const problems = this.#openApi.validateRequest(method, path, body);
    if (problems.length > 0) {
      this.#violation(method, path, "request", problems);
      send({ status: 400, text: `Error from API: invalid request: ${problems.join("; ")}` });
      return;
    }
    if (this.#holds.delete(path)) {
      this.#options.onRequest?.(record, undefined);
      return;
    }
    const failure = this.#failures.get(path);
    if (failure !== undefined) {
      this.#failures.delete(path);
      send({ status: failure.status, text: failure.text });
      return;
    }
    const refusal = this.#options.intercept?.(path, body as Record<string, unknown> | undefined);
    if (refusal !== undefined) {
      send(refusal);
      return;
    }
    send(this.#dispatch(path, body as Record<string, unknown> | undefined));
  }

  #answer(method: string, path: string, answer: Answer, res: ServerResponse): void {
    if (answer.status >= 200 && answer.status < 300) {
      const problems = this.#openApi.validateResponse(method, path, answer.status, answer.json);
      if (problems.length > 0) this.#violation(method, path, "response", problems);
    }
    if (answer.json !== undefined) {
      const text = JSON.stringify(answer.json);
      res.writeHead(answer.status, {
        "Content-Type": "application/json",
        "Content-Length": Buffer.byteLength(text),
      });
      res.end(text);
    } else if (answer.text !== undefined) {
      res.writeHead(answer.status, {
        "Content-Type": "text/plain",
        "Content-Length": Buffer.byteLength(answer.text),
      });
      res.end(answer.text);
    } else {
      res.writeHead(answer.status);
      res.end();
    }
    if (answer.exit === true) {
      this.exited = true;
      this.vm = undefined;
      res.on("finish", () => void this.#stopListening());
    }
  }

  #violation(method: string, path: string, side: "request" | "response", problems: string[]): void {
    this.violations.push({ method, path, side, problems });
  }

  #dispatch(path: string, body: Record<string, unknown> | undefined): Answer {
    const vm = this.vm;
    const noVm: Answer = { status: 404, text: "Error from API: the VM is not created" };
    const wrongState = (what: string): Answer => ({
      status: 405,
      text: `Error from API: cannot ${what} a VM that is ${vm?.state ?? "not created"}`,
    });
    switch (path) {
      case "/vmm.ping":
        return {
          status: 200,
          json: { version: "v0.0.0-fake", build_version: "fake", pid: process.pid, features: [] },
        };
      case "/vmm.shutdown":
        return { status: 204, exit: true };
      case "/vm.create": {
        if (vm !== undefined) return { status: 500, text: "Error from API: the VM is already created" };
        const config = structuredClone(body) as unknown as FakeVmConfig;
        this.vm = { state: "Created", config, memoryActualSize: bootMemory(config) };
        return { status: 204 };
      }
      case "/vm.boot":
        if (vm === undefined) return noVm;
        if (vm.state !== "Created" && vm.state !== "Shutdown") {
          return { status: 500, text: "Error from API: the VM is already booted" };
        }
        vm.state = "Running";
        return { status: 204 };
      case "/vm.shutdown":
        if (vm === undefined) return noVm;
        if (vm.state !== "Running" && vm.state !== "Paused") return wrongState("shut down");
        vm.state = "Shutdown";
        return { status: 204 };
      case "/vm.reboot":
      case "/vm.power-button":
        if (vm === undefined) return noVm;
        if (vm.state !== "Running")
          return wrongState(path === "/vm.reboot" ? "reboot" : "press the power button of");
        return { status: 204 };
      case "/vm.pause":
        if (vm === undefined) return noVm;
        if (vm.state !== "Running") return wrongState("pause");
        vm.state = "Paused";
        return { status: 204 };
      case "/vm.resume":
        if (vm === undefined) return noVm;
        if (vm.state !== "Paused") return wrongState("resume");
        vm.state = "Running";
        return { status: 204 };
      case "/vm.delete":
        this.vm = undefined;
        return { status: 204 };
      case "/vm.info":
        if (vm === undefined) return noVm;
        return {
          status: 200,
          json: { config: vm.config, state: vm.state, memory_actual_size: vm.memoryActualSize },
        };
      case "/vm.counters":
        if (vm === undefined) return { status: 500, text: "Error from API: the VM is not created" };
        return { status: 200, json: counters(vm.config) };
      case "/vm.resize":
        if (vm === undefined) return noVm;
        return this.#resize(vm, body ?? {});
      case "/vm.add-disk":
        return this.#add(vm, "disks", "_disk", body ?? {});
      case "/vm.add-net":
        return this.#add(vm, "net", "_net", body ?? {});
      case "/vm.add-device":
        return this.#add(vm, "devices", "_vfio", body ?? {});
      case "/vm.remove-device": {
        if (vm === undefined) return noVm;
        const id = body?.id;
        for (const list of [vm.config.disks, vm.config.net, vm.config.devices]) {
          const i = list?.findIndex((d) => d.id === id) ?? -1;
          if (list !== undefined && i >= 0) {
            list.splice(i, 1);
            return { status: 204 };
          }
        }
        return { status: 404, text: `Error from API: no device with id ${String(id)}` };
      }
      case "/vm.snapshot": {
        if (vm === undefined) return noVm;
        if (vm.state === "Created" || vm.state === "Shutdown") return wrongState("snapshot");
        if (vm.state !== "Paused")
          return { status: 500, text: "Error from API: the VM must be paused to snapshot" };
        const url = String(body?.destination_url ?? "");
        if (!url.startsWith("file://"))
          return { status: 500, text: `Error from API: unsupported URL ${url}` };
        this.snapshots.set(url, structuredClone(vm.config));
        return { status: 204 };
      }
      case "/vm.restore": {
        if (vm !== undefined) return { status: 404, text: "Error from API: a VM is already created" };
        const url = String(body?.source_url ?? "");
        const config = this.snapshots.get(url);
        if (config === undefined) return { status: 500, text: `Error from API: no snapshot at ${url}` };
        this.vm = {
          state: body?.resume === true ? "Running" : "Paused",
          config: structuredClone(config),
          memoryActualSize: bootMemory(config) + (config.memory?.hotplugged_size ?? 0),
        };
        return { status: 204 };
      }
      case "/vm.send-migration":
        if (vm === undefined || vm.state !== "Running") {
          return { status: 500, text: "Error from API: no running VM to migrate" };
        }
        if (body?.local === true && !sharedMemory(vm.config)) {
          return { status: 500, text: "Error from API: local migration needs shared guest memory" };
        }
        // The source VMM terminates once the VM has moved.
        return { status: 204, exit: true };
      case "/vm.receive-migration": {
        if (vm !== undefined) return { status: 500, text: "Error from API: a VM is already created" };
        const incoming = this.#options.incomingConfig;
        if (incoming !== undefined) {
          const config = structuredClone(incoming) as FakeVmConfig;
          this.vm = { state: "Running", config, memoryActualSize: bootMemory(config) };
        }
        return { status: 204 };
      }
      default:
        return { status: 500, text: `the fake does not implement ${path}` };
    }
  }

  #resize(vm: FakeVm, body: Record<string, unknown>): Answer {
    if (vm.state !== "Running" && vm.state !== "Paused")
      return { status: 405, text: "Error from API: VM not booted" };
    const { desired_vcpus: vcpus, desired_ram: ram, desired_balloon: balloon } = body;
    const cpus = vm.config.cpus ?? { boot_vcpus: 1, max_vcpus: 1 };
    const memory = vm.config.memory ?? { size: DEFAULT_MEMORY };
    if (typeof vcpus === "number" && vcpus > cpus.max_vcpus) {
      return { status: 500, text: `Error from API: ${vcpus} vCPUs exceed max_vcpus ${cpus.max_vcpus}` };
    }
    if (typeof ram === "number") {
      const limit = memory.size + (memory.hotplug_size ?? 0);
      if (ram > limit)
        return { status: 500, text: `Error from API: ${ram} bytes exceed the hotplug room (${limit})` };
      if (ram < vm.memoryActualSize)
        return { status: 500, text: "Error from API: memory cannot shrink by hotplug" };
    }
    if (balloon !== undefined) return { status: 500, text: "Error from API: the VM has no balloon" };
    if (typeof vcpus === "number") vm.config.cpus = { ...cpus, boot_vcpus: vcpus };
    if (typeof ram === "number") {
      vm.memoryActualSize = ram;
      vm.config.memory = { ...memory, hotplugged_size: ram - memory.size };
    }
    return { status: 204 };
  }

  #add(
    vm: FakeVm | undefined,
    list: "disks" | "net" | "devices",
    prefix: string,
    body: Record<string, unknown>,
  ): Answer {
    if (vm === undefined) return { status: 404, text: "Error from API: the VM is not created" };
    const id = typeof body.id === "string" ? body.id : `${prefix}${this.#nextAutoId++}`;
    const all = [...(vm.config.disks ?? []), ...(vm.config.net ?? []), ...(vm.config.devices ?? [])];
    if (all.some((d) => d.id === id)) {
      return { status: 409, text: `Error from API: a device with id ${id} already exists` };
    }
    // The body was validated against the endpoint's schema, which is the schema of the list's items.
    const entry = { ...body, id };
    const target: { id?: string }[] = vm.config[list] ?? [];
    target.push(entry);
    Object.assign(vm.config, { [list]: target });
    if (vm.state === "Created" || vm.state === "Shutdown") return { status: 204 };
    const slot = this.#nextSlot++;
    return { status: 200, json: { id, bdf: `0000:00:${slot.toString(16).padStart(2, "0")}.0` } };
  }
}

function bootMemory(config: VmConfig): number {
  const memory = config.memory;
  if (memory === undefined) return DEFAULT_MEMORY;
  return memory.size + (memory.zones ?? []).reduce((sum, z) => sum + z.size, 0);
}

/** Whether guest memory can be handed over by file descriptor: shared or huge-page backed, zone by zone. */
function sharedMemory(config: VmConfig): boolean {
  const m = config.memory;
  if (m === undefined) return false;
  if (m.shared === true || m.hugepages === true) return true;
  const zones = m.zones ?? [];
  return m.size === 0 && zones.length > 0 && zones.every((z) => z.shared === true || z.hugepages === true);
}

function counters(config: VmConfig): Record<string, Record<string, number>> {
  const out: Record<string, Record<string, number>> = {};
  for (const d of config.disks ?? []) {
    if (d.id !== undefined) out[d.id] = { read_bytes: 0, write_bytes: 0, read_ops: 0, write_ops: 0 };
  }
  for (const n of config.net ?? []) {
    if (n.id !== undefined) out[n.id] = { rx_bytes: 0, tx_bytes: 0, rx_frames: 0, tx_frames: 0 };
  }
  return out;
}
