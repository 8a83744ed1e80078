import { EventEmitter } from "node:events";
import * as net from "node:net";

/** An error QEMU answered a QMP command with. */
export class QmpError extends Error {
  override readonly name = "QmpError";
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

/** An asynchronous event QEMU sent (SHUTDOWN, STOP, RESUME, RESET, DEVICE_DELETED, …). */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** Microseconds since the epoch, as QEMU stamps it. */
  timestampUs: number;
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/**
 * A QMP client on a QEMU monitor's Unix socket: capabilities negotiation, commands correlated by id,
 * events as they come. Emits "event" (QmpEvent) and "close" (the socket ended: QEMU exited or closed
 * the monitor). One client per QEMU: the monitor serves one connection at a time.
 */
export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  readonly #socket: net.Socket;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #buf = "";
  #closed = false;
  /** What the greeting said about QEMU's version, e.g. "7.2.19". */
  version = "";

  private constructor(socket: net.Socket) {
    super();
    this.#socket = socket;
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(
    path: string,
    opts: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<QmpClient> {
    const socket = net.connect({ path });
    const client = new QmpClient(socket);
    const timeoutMs = opts.timeoutMs ?? 5000;
    const greeting = new Promise<Record<string, unknown>>((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`no QMP greeting on ${path} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      const abort = () => reject(opts.signal?.reason ?? new Error("aborted"));
      opts.signal?.addEventListener("abort", abort, { once: true });
      client.#onGreeting = (g) => {
        clearTimeout(t);
        opts.signal?.removeEventListener("abort", abort);
        resolve(g);
      };
      socket.once("error", (e) => {
        clearTimeout(t);
        reject(new Error(`cannot connect to QMP socket ${path}: ${e.message}`));
      });
    });
    socket.setEncoding("utf8");
    socket.on("data", (d: string) => client.#onData(d));
    socket.on("close", () => client.#onClose());
    socket.on("error", () => undefined); // surfaced through "close" and pending commands
    try {
      const g = (await greeting) as {
        QMP?: { version?: { qemu?: { major: number; minor: number; micro: number } } };
      };
      const v = g.QMP?.version?.qemu;
      if (v) client.version = `${v.major}.${v.minor}.${v.micro}`;
      await client.execute("qmp_capabilities");
    } catch (err) {
      socket.destroy();
      throw err;
    }
    return client;
  }

  #onGreeting: ((g: Record<string, unknown>) => void) | undefined;

  get closed(): boolean {
    return this.#closed;
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError on an `error` answer. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this.#closed) return Promise.reject(new Error(`QMP connection closed; cannot run ${command}`));
    const id = this.#nextId++;
    const timeoutMs = opts.timeoutMs ?? 30_000;
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => {
        this.#pending.delete(id);
        reject(new Error(`QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, {
        command,
        resolve: (v) => {
          clearTimeout(t);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
      this.#socket.write(
        `${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`,
      );
    });
  }

  /** Closes the connection (QEMU keeps running). */
  close(): void {
    this.#socket.destroy();
  }

  #onData(d: string): void {
    this.#buf += d;
    for (let i = this.#buf.indexOf("\n"); i >= 0; i = this.#buf.indexOf("\n")) {
      const line = this.#buf.slice(0, i).trim();
      this.#buf = this.#buf.slice(i + 1);
      if (line) this.#onMessage(line);
    }
  }

  #onMessage(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // not QMP; ignore
    }
    if ("QMP" in m) {
      this.#onGreeting?.(m);
      return;
    }
    if (typeof m.event === "string") {
      const ts = m.timestamp as { seconds: number; microseconds: number } | undefined;
      this.emit("event", {
        event: m.event,
        data: (m.data as Record<string, unknown>) ?? {},
        timestampUs: ts ? ts.seconds * 1e6 + ts.microseconds : Date.now() * 1000,
      });
      return;
    }
    const p = typeof m.id === "number" ? this.#pending.get(m.id) : undefined;
    if (!p || typeof m.id !== "number") return;
    this.#pending.delete(m.id);
    if ("error" in m) {
      const e = m.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? "GenericError", e.desc ?? "unknown error"));
    } else {
      p.resolve(m.return);
    }
  }

  #onClose(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#pending.values()) p.reject(new Error(`QMP connection closed during ${p.command}`));
    this.#pending.clear();
    this.emit("close");
  }
}
