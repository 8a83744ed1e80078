/**
 * Test helper: the process behind `fake-cloud-hypervisor.mjs`, a stand-in for the `cloud-hypervisor`
 * binary on hosts where it cannot run. What it mirrors of the real binary (v53, read from its source):
 *
 * - the command line: `--api-socket path=<p>`, `--event-monitor path=<p>`, `--log-file <p>`, `-v`,
 *   `--version`; anything else fails the way the real one's argument parser does (exit status 2,
 *   "error: unexpected argument … found" on stderr), so a driver that passes a flag the fake does not know
 *   fails its tests instead of passing them;
 * - the API on `--api-socket`: {@link FakeChApi} (validated against the published OpenAPI document, with
 *   its state machine), with `vmm.ping` reporting this process's pid;
 * - the event monitor: the file truncated at start, each event pretty-printed JSON followed by a blank
 *   line (`vmm starting`, `vm booting/booted`, `pausing/paused`, `resuming/resumed`,
 *   `rebooting/rebooted`, `vm shutdown`, `vm deleted`, `vmm shutdown`);
 * - the serial port in `Socket` mode: bound at `vm.create` (a stale file at its path makes the create
 *   fail, as the real bind does), one client at a time (a new one cuts the previous off), output kept
 *   while no client is connected (the last 1 MiB) and replayed on connect, re-made on reboot, removed on
 *   exit; `File` mode appends to the file;
 * - a guest: at boot it prints a banner, it echoes what it is sent, and it powers off 50 ms after the
 *   ACPI power button (then the VMM shuts down and exits with status 0, as without `--no-shutdown`);
 * - SIGTERM and SIGINT end it in order, as the real VMM's signal handler does; the API socket is removed
 *   when it ends in order, and left behind when it is killed.
 *
 * Two knobs for tests, from the environment: `FAKE_CH_REFUSE=/vm.boot` answers the first request to that
 * path with a 500, `FAKE_CH_HOLD=/vm.boot` never answers it.
 *
 * Every request is also appended, with the status it got and any contract violation, to
 * `<api socket>.requests.jsonl`, so that a test in another process can check what a driver sent.
 */
import { appendFileSync, existsSync, writeFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import * as net from "node:net";
import type { ConsoleConfig, SerialConfig, VmConfig } from "../types.js";
import { type Answer, FakeChApi, type RecordedRequest } from "./fake-api.js";

export const FAKE_CH_VERSION = "v53.0.0-fake";

/** Where the fake journals the requests it got, for an API socket. */
export function fakeChJournal(apiSocket: string): string {
  return `${apiSocket}.requests.jsonl`;
}

/** One line of the journal. */
export interface FakeChJournalEntry {
  method: string;
  path: string;
  body: unknown;
  status: number | undefined;
  /** What did not fit the document in this request or its answer. */
  violations: string[];
}

interface Args {
  apiSocket: string;
  eventMonitor: string | undefined;
  logFile: string | undefined;
  verbosity: number;
}

class UsageError extends Error {}

/** Parses the command line as the real binary's clap definition does, for the options the fake has. */
function parseArgs(argv: string[]): Args | "version" {
  const values = new Map<string, string>();
  let verbosity = 0;
  let version = false;
  const valued = new Set(["--api-socket", "--event-monitor", "--log-file"]);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? "";
    const eq = arg.indexOf("=");
    const name = arg.startsWith("--") && eq > 0 ? arg.slice(0, eq) : arg;
    if (valued.has(name)) {
      const value = name === arg ? argv[++i] : arg.slice(eq + 1);
      if (value === undefined) {
        throw new UsageError(`a value is required for '${name} <${name.slice(2)}>' but none was supplied`);
      }
      if (values.has(name)) {
        throw new UsageError(`the argument '${name} <${name.slice(2)}>' cannot be used multiple times`);
      }
      values.set(name, value);
    } else if (/^-v+$/.test(arg)) {
      verbosity += arg.length - 1;
    } else if (arg === "--version" || arg === "-V") {
      version = true;
    } else {
      throw new UsageError(`unexpected argument '${arg}' found`);
    }
  }
  if (version) return "version";
  const api = values.get("--api-socket");
  if (api === undefined) throw new Error("the fake needs --api-socket (it has no VM options)");
  const apiOptions = options("--api-socket", api, ["path", "fd"]);
  if (apiOptions.fd !== undefined) throw new Error("the fake does not take --api-socket fd=");
  const apiSocket = apiOptions.path ?? (api.includes("=") ? undefined : api);
  if (apiSocket === undefined) throw new Error("Error parsing --api-socket");
  let eventMonitor: string | undefined;
  const em = values.get("--event-monitor");
  if (em !== undefined) {
    const o = options("--event-monitor", em, ["path", "fd"]);
    if (o.fd !== undefined) throw new Error("the fake does not take --event-monitor fd=");
    if (o.path === undefined) throw new Error("Error parsing --event-monitor: path or fd required");
    eventMonitor = o.path;
  }
  return { apiSocket, eventMonitor, logFile: values.get("--log-file"), verbosity };
}

/** `key=value,key=value` as cloud-hypervisor's option parser reads it (no quoting: the fake refuses it). */
function options(flag: string, value: string, known: string[]): Record<string, string | undefined> {
  const out: Record<string, string | undefined> = {};
  if (/["[\]]/.test(value)) throw new Error(`the fake does not parse quotes or brackets in ${flag} ${value}`);
  for (const part of value.split(",")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    const key = part.slice(0, eq);
    if (!known.includes(key)) throw new Error(`Error parsing ${flag}: unknown option ${key}`);
    out[key] = part.slice(eq + 1);
  }
  return out;
}

/** The serial port's `Socket` mode: one client at a time, output kept while none is connected. */
class FakeSerialSocket {
  static readonly MAX_BUFFER = 1 << 20;
  readonly #path: string;
  readonly #server: net.Server;
  #client: net.Socket | undefined;
  #buffer = Buffer.alloc(0);

  constructor(path: string, onInput: (d: Buffer) => void) {
    this.#path = path;
    this.#server = net.createServer((c) => {
      this.#client?.destroy();
      this.#client = c;
      c.on("data", onInput);
      c.on("error", () => undefined);
      c.on("close", () => {
        if (this.#client === c) this.#client = undefined;
      });
      if (this.#buffer.length > 0) {
        c.write(this.#buffer);
        this.#buffer = Buffer.alloc(0);
      }
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#server.once("error", reject);
      this.#server.listen(this.#path, () => resolve());
    });
  }

  write(data: string | Buffer): void {
    const b = typeof data === "string" ? Buffer.from(data) : data;
    if (this.#client !== undefined) this.#client.write(b);
    else this.#buffer = Buffer.concat([this.#buffer, b]).subarray(-FakeSerialSocket.MAX_BUFFER);
  }

  close(): void {
    this.#client?.destroy();
    this.#server.close(); // unlinks the socket file
  }
}

/** Where the guest's serial output goes, per the VM's `serial` config. */
interface SerialPort {
  write(data: string | Buffer): void;
  close(): void;
}

class FakeVmm {
  readonly #args: Args;
  readonly #start = process.hrtime.bigint();
  readonly #journal: string;
  #api: FakeChApi | undefined;
  #serial: SerialPort | undefined;
  #stateBefore: string | undefined;
  #violationsSeen = 0;
  #ending = false;
  #exit: (code: number) => void = () => undefined;

  constructor(args: Args) {
    this.#args = args;
    this.#journal = fakeChJournal(args.apiSocket);
  }

  async run(): Promise<number> {
    const { apiSocket, eventMonitor, logFile } = this.#args;
    if (logFile !== undefined) writeFileSync(logFile, "");
    if (eventMonitor !== undefined) writeFileSync(eventMonitor, "");
    this.#event("vmm", "starting");
    await this.#clearStaleSocket(apiSocket);
    this.#api = await FakeChApi.start({
      socketPath: apiSocket,
      intercept: (path, body) => this.#intercept(path, body),
      onRequest: (r, sent) => this.#onRequest(r, sent),
    });
    // Test knobs, through the environment (a wrapper script sets them): refuse or never answer the
    // first request to a path.
    const refuse = process.env.FAKE_CH_REFUSE;
    if (refuse) this.#api.failNext(refuse, 500, `Error from API: refused (FAKE_CH_REFUSE=${refuse})`);
    const hold = process.env.FAKE_CH_HOLD;
    if (hold) this.#api.holdNext(hold);
    this.#log(1, `API server listening on ${apiSocket}`);
    const done = new Promise<number>((resolve) => {
      this.#exit = resolve;
    });
    for (const sig of ["SIGTERM", "SIGINT"] as const) process.on(sig, () => void this.#end(0));
    return done;
  }

  /** Like the real VMM under its lock: a socket nobody answers on is stale and goes; a live one is in use. */
  async #clearStaleSocket(path: string): Promise<void> {
    if (!existsSync(path)) return;
    const inUse = await new Promise<boolean>((resolve) => {
      const s = net.connect({ path }, () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (inUse) throw new Error(`Error starting the HTTP API server: API socket ${path} is in use`);
    await rm(path, { force: true });
  }

  #intercept(path: string, body: Record<string, unknown> | undefined): Answer | undefined {
    this.#stateBefore = this.#api?.vm?.state;
    if (path === "/vm.create" && this.#api?.vm === undefined) {
      const serial = (body as VmConfig | undefined)?.serial;
      if (serial?.mode === "Socket" && serial.socket !== undefined && existsSync(serial.socket)) {
        return {
          status: 500,
          text: `Error from API: Error creating console devices: Error binding to socket ${serial.socket}: Address in use`,
        };
      }
    }
    return undefined;
  }

  #onRequest(r: RecordedRequest, sent: Promise<void> | undefined): void {
    const api = this.#api;
    if (api === undefined) return;
    const violations = api.violations
      .slice(this.#violationsSeen)
      .map((v) => `${v.side}: ${v.problems.join("; ")}`);
    this.#violationsSeen = api.violations.length;
    const entry: FakeChJournalEntry = {
      method: r.method,
      path: r.path,
      body: r.body,
      status: r.status,
      violations,
    };
    appendFileSync(this.#journal, `${JSON.stringify(entry)}\n`);
    if (r.status === undefined || r.status >= 300) return;
    const before = this.#stateBefore;
    const config = api.vm?.config;
    switch (r.path) {
      case "/vm.create":
        if (config !== undefined) void this.#openSerial(config);
        break;
      case "/vm.boot":
        if (config !== undefined) void this.#boot(config);
        break;
      case "/vm.pause":
        this.#event("vm", "pausing");
        this.#event("vm", "paused");
        break;
      case "/vm.resume":
        this.#event("vm", "resuming");
        this.#event("vm", "resumed");
        break;
      case "/vm.reboot":
        if (config !== undefined) void this.#reboot(config);
        break;
      case "/vm.power-button":
        // The guest honours ACPI: it shuts down, and the VMM with it.
        setTimeout(() => void this.#end(0), 50);
        break;
      case "/vm.shutdown":
        this.#closeSerial();
        this.#event("vm", "shutdown");
        break;
      case "/vm.delete":
        this.#closeSerial();
        if (before === "Running" || before === "Paused") this.#event("vm", "shutdown");
        if (before !== undefined) this.#event("vm", "deleted");
        break;
      case "/vmm.shutdown":
        this.#ending = true;
        this.#closeSerial();
        this.#endEvents(before);
        void sent?.then(() => this.#exitNow(0));
        break;
    }
  }

  async #openSerial(config: VmConfig): Promise<void> {
    this.#closeSerial();
    const serial: SerialConfig | ConsoleConfig | undefined = config.serial;
    if (serial?.mode === "Socket" && serial.socket !== undefined) {
      const port = new FakeSerialSocket(serial.socket, (d) => this.#serial?.write(d));
      this.#serial = port;
      await port.listen().catch((e: Error) => this.#log(0, `serial socket: ${e.message}`));
    } else if (serial?.mode === "File" && serial.file !== undefined) {
      const file = serial.file;
      this.#serial = { write: (d) => appendFileSync(file, d), close: () => undefined };
    }
  }

  #closeSerial(): void {
    this.#serial?.close();
    this.#serial = undefined;
  }

  async #boot(config: VmConfig): Promise<void> {
    this.#event("vm", "booting");
    if (this.#serial === undefined) await this.#openSerial(config);
    const p = config.payload;
    this.#serial?.write(
      `fake-cloud-hypervisor ${FAKE_CH_VERSION}: booting ${p.kernel ?? p.firmware ?? "?"} (${p.cmdline ?? ""})\r\n`,
    );
    this.#serial?.write("fake guest: ready\r\n");
    this.#event("vm", "booted");
  }

  async #reboot(config: VmConfig): Promise<void> {
    this.#event("vm", "rebooting");
    this.#closeSerial();
    await this.#openSerial(config);
    await this.#boot(config);
    this.#event("vm", "rebooted");
  }

  /** Ends in order: the VM goes, the events are written, the sockets removed, then the process exits. */
  async #end(code: number): Promise<void> {
    if (this.#ending) return;
    this.#ending = true;
    this.#closeSerial();
    this.#endEvents(this.#api?.vm?.state);
    await this.#exitNow(code);
  }

  #endEvents(before: string | undefined): void {
    if (before === "Running" || before === "Paused") this.#event("vm", "shutdown");
    if (before !== undefined) this.#event("vm", "deleted");
    this.#event("vmm", "shutdown");
  }

  async #exitNow(code: number): Promise<void> {
    await this.#api?.close();
    this.#exit(code);
  }

  #event(source: string, event: string, properties?: Record<string, string>): void {
    const path = this.#args.eventMonitor;
    if (path === undefined) return;
    const ns = process.hrtime.bigint() - this.#start;
    const e = {
      timestamp: { secs: Number(ns / 1_000_000_000n), nanos: Number(ns % 1_000_000_000n) },
      source,
      event,
      properties: properties ?? null,
    };
    appendFileSync(path, `${JSON.stringify(e, null, 2)}\n\n`);
    this.#log(1, `Event: source = ${source} event = ${event}`);
  }

  #log(level: number, message: string): void {
    if (level > this.#args.verbosity) return;
    const line = `cloud-hypervisor: ${message}\n`;
    if (this.#args.logFile !== undefined) appendFileSync(this.#args.logFile, line);
    else process.stderr.write(line);
  }
}

/** Runs the fake; resolves with the exit status. */
export async function main(argv: string[]): Promise<number> {
  let args: Args | "version";
  try {
    args = parseArgs(argv);
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(
        `error: ${e.message}\n\nUsage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'.\n`,
      );
      return 2;
    }
    return fatal(e);
  }
  if (args === "version") {
    process.stdout.write(`cloud-hypervisor ${FAKE_CH_VERSION}\n`);
    return 0;
  }
  try {
    return await new FakeVmm(args).run();
  } catch (e) {
    return fatal(e);
  }
}

/** As the real binary prints the error that ends it. */
function fatal(e: unknown): number {
  process.stderr.write(
    `Error: Cloud Hypervisor exited with the following error:\n  ${(e as Error).message}\n`,
  );
  return 1;
}
