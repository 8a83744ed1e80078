/**
 * The serial console of a cloud-hypervisor VM, as the agent serves it.
 *
 * cloud-hypervisor's serial port in `Socket` mode listens on a Unix socket and serves one client at a
 * time: a new connection shuts the previous one down. While no client is connected, releases from v53
 * keep the last 1 MiB of output and replay it to the next client; older releases drop it. It writes no
 * log file of its own in that mode.
 *
 * The agent expects more (see `VmPaths`): a console socket that several readers may connect to (the
 * console tap that watches for the guest's ready line, a user's console stream) and a `serial.log` with
 * everything the guest printed. So the VMM's socket lives at a private path, and this relay, in the agent,
 * holds the one connection to it, appends everything it reads to `serial.log`, and serves the agent's
 * console socket: output goes to every connected client, input from any client goes to the guest.
 *
 * The gap: the relay runs in the agent. While the agent is down nothing reads the VMM's socket; what the
 * guest prints meanwhile reaches `serial.log` only through the VMM's replay buffer (v53 and later, last
 * 1 MiB), when the next agent adopts the VM.
 */
import { createWriteStream, type WriteStream } from "node:fs";
import { rm } from "node:fs/promises";
import * as net from "node:net";

export interface SerialRelayOptions {
  /** The VMM's serial socket (`serial.socket` of the VM config). */
  vmmSocket: string;
  /** The socket the agent's console readers connect to (`VmPaths.serialSocket`). */
  clientSocket: string;
  /** Where all output is appended (`VmPaths.serialLog`). */
  logFile: string;
  /** Delay between attempts to reach the VMM's socket (absent before `vm.create`, re-made on reboot). */
  retryMs?: number;
  /** A client that has more than this many bytes of output waiting is cut off. Default 1 MiB. */
  maxClientBacklog?: number;
}

export class SerialRelay {
  readonly #opts: Required<SerialRelayOptions>;
  readonly #server: net.Server;
  readonly #clients = new Set<net.Socket>();
  readonly #log: WriteStream;
  #vmm: net.Socket | undefined;
  #retry: NodeJS.Timeout | undefined;
  #closed = false;

  private constructor(opts: SerialRelayOptions) {
    this.#opts = { retryMs: 100, maxClientBacklog: 1 << 20, ...opts };
    this.#log = createWriteStream(opts.logFile, { flags: "a" });
    this.#log.on("error", () => undefined); // a log that cannot be written must not stop the console
    this.#server = net.createServer((client) => this.#onClient(client));
  }

  /** Serves the console socket (replacing a stale one) and starts reading the VMM's. */
  static async start(opts: SerialRelayOptions): Promise<SerialRelay> {
    const relay = new SerialRelay(opts);
    await rm(opts.clientSocket, { force: true });
    try {
      await new Promise<void>((resolve, reject) => {
        relay.#server.once("error", reject);
        relay.#server.listen(opts.clientSocket, () => {
          relay.#server.off("error", reject);
          resolve();
        });
      });
    } catch (err) {
      relay.#log.end();
      throw err;
    }
    relay.#connect();
    return relay;
  }

  /** Whether the relay holds a connection to the VMM's socket now. */
  get connected(): boolean {
    return this.#vmm !== undefined;
  }

  #connect(): void {
    if (this.#closed) return;
    const s = net.connect({ path: this.#opts.vmmSocket });
    s.on("connect", () => {
      this.#vmm = s;
    });
    s.on("data", (d: Buffer) => {
      this.#log.write(d);
      for (const c of this.#clients) {
        if (c.writableLength > this.#opts.maxClientBacklog) c.destroy();
        else c.write(d);
      }
    });
    s.on("error", () => undefined);
    s.on("close", () => {
      if (this.#vmm === s) this.#vmm = undefined;
      if (this.#closed) return;
      this.#retry = setTimeout(() => this.#connect(), this.#opts.retryMs);
    });
  }

  #onClient(client: net.Socket): void {
    if (this.#closed) {
      client.destroy();
      return;
    }
    this.#clients.add(client);
    client.on("data", (d: Buffer) => this.#vmm?.write(d));
    client.on("error", () => undefined);
    client.on("close", () => this.#clients.delete(client));
  }

  /** Stops relaying: closes every connection and the console socket, and flushes the log. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#retry);
    this.#vmm?.destroy();
    for (const c of this.#clients) c.destroy();
    // Closing the server unlinks its socket file (libuv does); removing it by path here could remove
    // the socket of a relay that has replaced this one.
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    await new Promise<void>((resolve) => this.#log.end(resolve));
  }
}
