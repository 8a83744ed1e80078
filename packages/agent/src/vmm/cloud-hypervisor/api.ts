/**
 * Client of the REST API that a cloud-hypervisor process serves on its `--api-socket`: HTTP/1.1 over a
 * Unix socket, one request per connection, paths under `/api/v1/`, JSON request bodies, JSON or empty
 * success answers and plain-text error answers.
 *
 * Every endpoint the client uses is listed in {@link CH_ENDPOINTS} with the success statuses the client
 * accepts; `contract.test.ts` checks that table against the published OpenAPI document.
 *
 * Time limits and aborts only stop the waiting: the VMM carries on with a request it has read (a snapshot
 * or a migration keeps running). cloud-hypervisor also handles one API request at a time, so while
 * `sendMigration`, `receiveMigration`, `snapshot` or `restore` runs, other calls on the same socket wait.
 */
import { type ClientRequest, request } from "node:http";
import {
  CloudHypervisorApiError,
  CloudHypervisorProtocolError,
  CloudHypervisorTimeoutError,
  CloudHypervisorUnreachableError,
  CONNECT_ERROR_CODES,
} from "./errors.js";
import type {
  DeviceConfig,
  DiskConfig,
  NetConfig,
  PciDeviceInfo,
  ReceiveMigrationData,
  RestoreConfig,
  SendMigrationData,
  VmConfig,
  VmCounters,
  VmInfo,
  VmmPingResponse,
  VmRemoveDevice,
  VmResize,
  VmSnapshotConfig,
  VmState,
} from "./types.js";

/** Prefix of every API path. */
export const CH_API_PREFIX = "/api/v1";

/** One endpoint as the client uses it. */
export interface ChEndpoint {
  method: "GET" | "PUT";
  /** Path below {@link CH_API_PREFIX}, as the OpenAPI document writes it. */
  path: string;
  /** Whether the client sends a JSON body. */
  body: boolean;
  /** Statuses taken as success; any other status is an error. 200 comes with a JSON body, 204 without. */
  success: readonly number[];
  /** Lasts as long as copying guest memory: gets the long time limit. */
  long?: boolean;
}

/** The endpoints, keyed by the name of the client method that calls each. */
export const CH_ENDPOINTS = {
  ping: { method: "GET", path: "/vmm.ping", body: false, success: [200] },
  vmmShutdown: { method: "PUT", path: "/vmm.shutdown", body: false, success: [204] },
  create: { method: "PUT", path: "/vm.create", body: true, success: [204] },
  boot: { method: "PUT", path: "/vm.boot", body: false, success: [204] },
  shutdown: { method: "PUT", path: "/vm.shutdown", body: false, success: [204] },
  reboot: { method: "PUT", path: "/vm.reboot", body: false, success: [204] },
  pause: { method: "PUT", path: "/vm.pause", body: false, success: [204] },
  resume: { method: "PUT", path: "/vm.resume", body: false, success: [204] },
  powerButton: { method: "PUT", path: "/vm.power-button", body: false, success: [204] },
  info: { method: "GET", path: "/vm.info", body: false, success: [200] },
  delete: { method: "PUT", path: "/vm.delete", body: false, success: [204] },
  snapshot: { method: "PUT", path: "/vm.snapshot", body: true, success: [204], long: true },
  restore: { method: "PUT", path: "/vm.restore", body: true, success: [204], long: true },
  resize: { method: "PUT", path: "/vm.resize", body: true, success: [204] },
  addDisk: { method: "PUT", path: "/vm.add-disk", body: true, success: [200, 204] },
  addNet: { method: "PUT", path: "/vm.add-net", body: true, success: [200, 204] },
  addDevice: { method: "PUT", path: "/vm.add-device", body: true, success: [200, 204] },
  removeDevice: { method: "PUT", path: "/vm.remove-device", body: true, success: [204] },
  sendMigration: { method: "PUT", path: "/vm.send-migration", body: true, success: [204], long: true },
  receiveMigration: { method: "PUT", path: "/vm.receive-migration", body: true, success: [204], long: true },
  counters: { method: "GET", path: "/vm.counters", body: false, success: [200] },
} as const satisfies Record<string, ChEndpoint>;

export type ChEndpointName = keyof typeof CH_ENDPOINTS;

/** Default time limit of a call: generous, since the VMM serialises requests. */
export const DEFAULT_CALL_TIMEOUT_MS = 30_000;

export interface CloudHypervisorClientOptions {
  /** The VMM's `--api-socket` path. */
  socketPath: string;
  /** Time limit of a call in ms; 0 for none. Default {@link DEFAULT_CALL_TIMEOUT_MS}. */
  timeoutMs?: number;
  /** Time limit of snapshot, restore and migration calls in ms; 0 (the default) for none. */
  longTimeoutMs?: number;
  /** Largest answer body read, in bytes. Default 16 MiB. */
  maxResponseBytes?: number;
}

export interface CallOptions {
  /** Aborting rejects the call with the signal's reason. */
  signal?: AbortSignal;
  /** Time limit of this call in ms, replacing the client's; 0 for none. */
  timeoutMs?: number;
}

interface RawAnswer {
  status: number;
  text: string;
}

/** What {@link CloudHypervisorClient.raw} takes as a path: `/vm.info`, `/vmm.ping`, `/vm.add-disk` … */
const RAW_PATH = /^\/[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*$/;

const VM_STATES: ReadonlySet<string> = new Set<VmState>([
  "Created",
  "Running",
  "Shutdown",
  "Paused",
  "BreakPoint",
]);

/** A typed client of one VMM's API socket. Stateless: each call opens its own connection. */
export class CloudHypervisorClient {
  readonly socketPath: string;
  readonly #timeoutMs: number;
  readonly #longTimeoutMs: number;
  readonly #maxResponseBytes: number;

  constructor(options: CloudHypervisorClientOptions) {
    this.socketPath = options.socketPath;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    this.#longTimeoutMs = options.longTimeoutMs ?? 0;
    this.#maxResponseBytes = options.maxResponseBytes ?? 16 * 1024 * 1024;
  }

  /** Whether the VMM answers, and its version. */
  async ping(options?: CallOptions): Promise<VmmPingResponse> {
    const json = await this.#json("ping", undefined, options);
    const o = this.#object("ping", json);
    if (typeof o.version !== "string") throw this.#malformed("ping", "no version");
    const answer: VmmPingResponse = { version: o.version };
    if (typeof o.build_version === "string") answer.build_version = o.build_version;
    if (typeof o.pid === "number") answer.pid = o.pid;
    if (Array.isArray(o.features)) answer.features = o.features.filter((f) => typeof f === "string");
    return answer;
  }

  /** Stops the VMM process (and the VM in it); the socket goes away. */
  async vmmShutdown(options?: CallOptions): Promise<void> {
    await this.#call("vmmShutdown", undefined, options);
  }

  /** Creates the VM from its config, without booting it. */
  async create(config: VmConfig, options?: CallOptions): Promise<void> {
    await this.#call("create", config, options);
  }

  async boot(options?: CallOptions): Promise<void> {
    await this.#call("boot", undefined, options);
  }

  /** Stops the VM at once (no guest shutdown); it can be booted again. */
  async shutdown(options?: CallOptions): Promise<void> {
    await this.#call("shutdown", undefined, options);
  }

  async reboot(options?: CallOptions): Promise<void> {
    await this.#call("reboot", undefined, options);
  }

  async pause(options?: CallOptions): Promise<void> {
    await this.#call("pause", undefined, options);
  }

  async resume(options?: CallOptions): Promise<void> {
    await this.#call("resume", undefined, options);
  }

  /** Presses the ACPI power button: asks the guest to shut down. */
  async powerButton(options?: CallOptions): Promise<void> {
    await this.#call("powerButton", undefined, options);
  }

  /** The VM's config (as it is now, hotplugged devices included), state and plugged memory. */
  async info(options?: CallOptions): Promise<VmInfo> {
    const o = this.#object("info", await this.#json("info", undefined, options));
    const { config, state } = o;
    if (typeof config !== "object" || config === null || Array.isArray(config)) {
      throw this.#malformed("info", "no config");
    }
    if (typeof state !== "string" || !VM_STATES.has(state)) {
      throw this.#malformed("info", `unknown state ${JSON.stringify(state)}`);
    }
    const info: VmInfo = { config: config as VmConfig, state: state as VmState };
    if (typeof o.memory_actual_size === "number") info.memory_actual_size = o.memory_actual_size;
    return info;
  }

  /** Removes the VM (stopping it first if it runs); the VMM process stays. */
  async delete(options?: CallOptions): Promise<void> {
    await this.#call("delete", undefined, options);
  }

  /** Writes a snapshot of the (paused) VM into a directory. */
  async snapshot(body: VmSnapshotConfig, options?: CallOptions): Promise<void> {
    await this.#call("snapshot", body, options);
  }

  /** Restores a snapshot into a VMM that has no VM yet. */
  async restore(body: RestoreConfig, options?: CallOptions): Promise<void> {
    await this.#call("restore", body, options);
  }

  /** Hot-plugs or unplugs vCPUs and memory, or inflates/deflates the balloon. */
  async resize(body: VmResize, options?: CallOptions): Promise<void> {
    await this.#call("resize", body, options);
  }

  /** Adds a disk: its PCI address when the VM runs (hotplug), undefined when it is cold-added. */
  async addDisk(disk: DiskConfig, options?: CallOptions): Promise<PciDeviceInfo | undefined> {
    return this.#added("addDisk", disk, options);
  }

  async addNet(net: NetConfig, options?: CallOptions): Promise<PciDeviceInfo | undefined> {
    return this.#added("addNet", net, options);
  }

  /** Adds a VFIO device (a GPU …). */
  async addDevice(device: DeviceConfig, options?: CallOptions): Promise<PciDeviceInfo | undefined> {
    return this.#added("addDevice", device, options);
  }

  /** Removes any device by id (disk, NIC, VFIO …). */
  async removeDevice(body: VmRemoveDevice, options?: CallOptions): Promise<void> {
    await this.#call("removeDevice", body, options);
  }

  /** Migrates the VM out; answers when the migration is over. The source VMM then terminates. */
  async sendMigration(body: SendMigrationData, options?: CallOptions): Promise<void> {
    await this.#call("sendMigration", body, options);
  }

  /** Waits for a migration to arrive at `receiver_url`; answers when the VM has been received. */
  async receiveMigration(body: ReceiveMigrationData, options?: CallOptions): Promise<void> {
    await this.#call("receiveMigration", body, options);
  }

  /** Per-device counters (bytes and operations read and written …). */
  async counters(options?: CallOptions): Promise<VmCounters> {
    const o = this.#object("counters", await this.#json("counters", undefined, options));
    const counters: VmCounters = {};
    for (const [device, values] of Object.entries(o)) {
      if (typeof values !== "object" || values === null) continue;
      const numbers: Record<string, number> = {};
      for (const [k, v] of Object.entries(values)) if (typeof v === "number") numbers[k] = v;
      counters[device] = numbers;
    }
    return counters;
  }

  /**
   * Any endpoint, for debugging passthrough: `path` below {@link CH_API_PREFIX} (`/vm.info`), a JSON
   * body or none. Any 2xx is success; answers the parsed JSON body, or undefined when there is none. Not
   * in {@link CH_ENDPOINTS}: its caller chooses the path, so the contract test cannot check it.
   */
  async raw(method: "GET" | "PUT", path: string, body?: object, options: CallOptions = {}): Promise<unknown> {
    if (!RAW_PATH.test(path)) throw new TypeError(`not an API endpoint path: ${JSON.stringify(path)}`);
    const endpoint: ChEndpoint = { method, path, body: body !== undefined, success: [200, 201, 202, 204] };
    const label = `${method} ${CH_API_PREFIX}${path}`;
    const answer = await this.#request(endpoint, label, body, options);
    if (answer.text.trim() === "") return undefined;
    try {
      return JSON.parse(answer.text) as unknown;
    } catch (cause) {
      throw new CloudHypervisorProtocolError(
        this.socketPath,
        label,
        `answer is not JSON: ${JSON.stringify(answer.text.slice(0, 200))}`,
        answer.status,
        { cause },
      );
    }
  }

  async #added(
    name: "addDisk" | "addNet" | "addDevice",
    body: object,
    options: CallOptions | undefined,
  ): Promise<PciDeviceInfo | undefined> {
    const answer = await this.#call(name, body, options);
    if (answer.status === 204) return undefined;
    const o = this.#object(name, this.#parse(name, answer));
    if (typeof o.id !== "string" || typeof o.bdf !== "string") throw this.#malformed(name, "no id or bdf");
    return { id: o.id, bdf: o.bdf };
  }

  async #json(
    name: ChEndpointName,
    body: object | undefined,
    options: CallOptions | undefined,
  ): Promise<unknown> {
    return this.#parse(name, await this.#call(name, body, options));
  }

  #parse(name: ChEndpointName, answer: RawAnswer): unknown {
    try {
      return JSON.parse(answer.text) as unknown;
    } catch (cause) {
      throw new CloudHypervisorProtocolError(
        this.socketPath,
        endpointLabel(name),
        `answer is not JSON: ${JSON.stringify(answer.text.slice(0, 200))}`,
        answer.status,
        { cause },
      );
    }
  }

  #object(name: ChEndpointName, json: unknown): Record<string, unknown> {
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      throw this.#malformed(name, "answer is not a JSON object");
    }
    return json as Record<string, unknown>;
  }

  #malformed(name: ChEndpointName, what: string): CloudHypervisorProtocolError {
    return new CloudHypervisorProtocolError(
      this.socketPath,
      endpointLabel(name),
      `malformed answer: ${what}`,
      200,
    );
  }

  /** Sends one request and reads the whole answer; a non-success status throws. */
  #call(name: ChEndpointName, body: object | undefined, options: CallOptions = {}): Promise<RawAnswer> {
    return this.#request(CH_ENDPOINTS[name], endpointLabel(name), body, options);
  }

  async #request(
    endpoint: ChEndpoint,
    label: string,
    body: object | undefined,
    options: CallOptions,
  ): Promise<RawAnswer> {
    const timeoutMs = options.timeoutMs ?? (endpoint.long === true ? this.#longTimeoutMs : this.#timeoutMs);
    const answer = await this.#send(endpoint, label, body, timeoutMs, options.signal);
    if (endpoint.success.includes(answer.status)) return answer;
    if (answer.status >= 200 && answer.status < 300) {
      throw new CloudHypervisorProtocolError(
        this.socketPath,
        label,
        `unexpected success status ${answer.status} (expected ${endpoint.success.join(" or ")})`,
        answer.status,
      );
    }
    throw new CloudHypervisorApiError(this.socketPath, label, answer.status, answer.text);
  }

  #send(
    endpoint: ChEndpoint,
    label: string,
    body: object | undefined,
    timeoutMs: number,
    signal: AbortSignal | undefined,
  ): Promise<RawAnswer> {
    const socketPath = this.socketPath;
    const maxBytes = this.#maxResponseBytes;
    return new Promise<RawAnswer>((resolve, reject) => {
      if (signal?.aborted === true) {
        reject(signal.reason);
        return;
      }
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      const headers: Record<string, string> = { Host: "localhost", Accept: "application/json" };
      if (payload !== undefined) {
        headers["Content-Type"] = "application/json";
        headers["Content-Length"] = String(payload.length);
      }
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      let req: ClientRequest | undefined;
      const settle = (action: () => void): void => {
        if (settled) return;
        settled = true;
        if (timer !== undefined) clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        action();
      };
      const onAbort = (): void => {
        settle(() => reject(signal?.reason));
        req?.destroy();
      };

      req = request(
        {
          socketPath,
          method: endpoint.method,
          path: `${CH_API_PREFIX}${endpoint.path}`,
          headers,
          agent: false,
        },
        (res) => {
          const chunks: Buffer[] = [];
          let size = 0;
          res.on("data", (chunk: Buffer) => {
            size += chunk.length;
            if (size > maxBytes) {
              settle(() =>
                reject(
                  new CloudHypervisorProtocolError(
                    socketPath,
                    label,
                    `answer larger than ${maxBytes} bytes`,
                    res.statusCode,
                  ),
                ),
              );
              res.destroy();
              return;
            }
            chunks.push(chunk);
          });
          res.on("end", () => {
            settle(() =>
              resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }),
            );
          });
          res.on("close", () => {
            if (!res.complete) {
              settle(() =>
                reject(
                  new CloudHypervisorProtocolError(
                    socketPath,
                    label,
                    "connection lost while reading the answer",
                    res.statusCode,
                  ),
                ),
              );
            }
          });
          res.on("error", (cause) => {
            settle(() =>
              reject(
                new CloudHypervisorProtocolError(
                  socketPath,
                  label,
                  "connection lost while reading the answer",
                  res.statusCode,
                  {
                    cause,
                  },
                ),
              ),
            );
          });
        },
      );
      req.on("error", (cause: NodeJS.ErrnoException) => {
        const code = cause.code ?? "";
        settle(() =>
          reject(
            CONNECT_ERROR_CODES.has(code)
              ? new CloudHypervisorUnreachableError(socketPath, label, code, cause)
              : new CloudHypervisorProtocolError(
                  socketPath,
                  label,
                  `connection lost before the answer (${code || cause.message})`,
                  undefined,
                  { cause },
                ),
          ),
        );
      });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          settle(() => reject(new CloudHypervisorTimeoutError(socketPath, label, timeoutMs)));
          req?.destroy();
        }, timeoutMs);
      }
      signal?.addEventListener("abort", onAbort, { once: true });
      req.end(payload);
    });
  }
}

function endpointLabel(name: ChEndpointName): string {
  const e = CH_ENDPOINTS[name];
  return `${e.method} ${CH_API_PREFIX}${e.path}`;
}
