import { EventEmitter } from "node:events";
import { open, stat } from "node:fs/promises";
import * as net from "node:net";

/**
 * The agent's connection to a VM's serial console socket: writes input, watches output for the guest's
 * ready line. What the console printed is also in serial.log (written by the VMM itself, so nothing is
 * lost while the agent is down); history and follow-mode streaming read that file.
 */
export class ConsoleTap extends EventEmitter<{ ready: [string] }> {
  #socket: net.Socket | undefined;
  #tail = "";
  #closed = false;

  /**
   * `logPath` and `logOffset`: where the VMM logs the console and how long that log was when the VMM
   * started. Output printed before the tap connects reaches only the log, so the tap also looks there once.
   */
  constructor(
    private readonly path: string,
    private readonly readyPattern: RegExp,
    private readonly log?: { path: string; offset: number },
  ) {
    super();
    this.#connect(0);
  }

  async #scanLog(): Promise<void> {
    if (!this.log) return;
    const fh = await open(this.log.path, "r").catch(() => undefined);
    if (!fh) return;
    try {
      const size = (await fh.stat()).size;
      const start = Math.max(this.log.offset, size - (1 << 20));
      const buf = Buffer.alloc(Math.max(0, size - start));
      await fh.read(buf, 0, buf.length, start);
      for (const l of buf.toString("latin1").split(/\r?\n/))
        if (this.readyPattern.test(l)) this.emit("ready", l);
    } finally {
      await fh.close();
    }
  }

  #connect(attempt: number): void {
    if (this.#closed) return;
    const s = net.connect({ path: this.path });
    s.on("connect", () => {
      this.#socket = s;
      void this.#scanLog().catch(() => undefined);
    });
    s.on("data", (d: Buffer) => {
      const text = this.#tail + d.toString("latin1");
      const lines = text.split(/\r?\n/);
      this.#tail = (lines.pop() ?? "").slice(-4096);
      for (const l of lines) if (this.readyPattern.test(l)) this.emit("ready", l);
    });
    s.on("error", () => undefined);
    s.on("close", () => {
      this.#socket = undefined;
      // The VMM may not have created its socket yet, or restarted: try again for a while.
      if (!this.#closed && attempt < 100) setTimeout(() => this.#connect(attempt + 1), 100).unref();
    });
  }

  /** Sends bytes to the guest's console; false when the console is not connected. */
  write(data: Uint8Array): boolean {
    if (!this.#socket) return false;
    this.#socket.write(data);
    return true;
  }

  close(): void {
    this.#closed = true;
    this.#socket?.destroy();
  }
}

/** One chunk of console output with its byte offset in serial.log. */
export interface ConsoleChunk {
  data: Buffer;
  offset: number;
}

/**
 * Reads serial.log: from `lastLines` lines before its end (or from its start), then, with `follow`,
 * what is appended, until `signal` aborts. Bounded: at most `maxHistory` bytes of history.
 */
export async function* readConsole(
  logPath: string,
  opts: { lastLines?: number; follow: boolean; signal: AbortSignal; maxHistory?: number; pollMs?: number },
): AsyncGenerator<ConsoleChunk> {
  const maxHistory = opts.maxHistory ?? 1 << 20;
  const fh = await open(logPath, "r").catch(() => undefined);
  if (!fh) return;
  try {
    let size = (await fh.stat()).size;
    let pos = Math.max(0, size - maxHistory);
    if (opts.lastLines !== undefined && opts.lastLines > 0) {
      const start = Math.max(0, size - maxHistory);
      const buf = Buffer.alloc(size - start);
      await fh.read(buf, 0, buf.length, start);
      let n = 0;
      let i = buf.length - 1;
      if (buf[i] === 0x0a) i--;
      for (; i >= 0; i--) if (buf[i] === 0x0a && ++n === opts.lastLines) break;
      pos = start + i + 1;
    }
    for (;;) {
      if (pos < size) {
        const buf = Buffer.alloc(Math.min(size - pos, 64 * 1024));
        const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
        if (bytesRead > 0) {
          yield { data: buf.subarray(0, bytesRead), offset: pos };
          pos += bytesRead;
          continue;
        }
      }
      if (!opts.follow || opts.signal.aborted) return;
      await new Promise((r) => setTimeout(r, opts.pollMs ?? 100));
      if (opts.signal.aborted) return;
      size = (await stat(logPath).catch(() => ({ size }))).size;
      if (size < pos) pos = 0; // the log was truncated
    }
  } finally {
    await fh.close();
  }
}
