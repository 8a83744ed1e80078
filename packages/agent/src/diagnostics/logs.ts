import { EventEmitter } from "node:events";

export type LogSeverity = "debug" | "info" | "warn" | "error";

/** One structured log line of the agent, as StreamLogs serves it. */
export interface LogRecord {
  /** Position in the agent's log since it started (1, 2, …). */
  seq: number;
  timeMs: number;
  level: LogSeverity;
  /** The part of the agent that wrote it: "rpc", "vm", "block", "network", "operations", "agent". */
  component: string;
  message: string;
  /** `operations/{id}`, or "". */
  operation: string;
  /** The resource it is about (`vms/web-1`), or "". */
  target: string;
  attributes: Record<string, string>;
}

export const SEVERITY_RANK: Record<LogSeverity, number> = { debug: 1, info: 2, warn: 3, error: 4 };

/** pino's numeric levels → ours (trace counts as debug, fatal as error). */
function severity(level: unknown): LogSeverity {
  const n = typeof level === "number" ? level : 30;
  return n >= 50 ? "error" : n >= 40 ? "warn" : n >= 30 ? "info" : "debug";
}

/** Fields every line has, which are not attributes. */
const BASE = new Set(["time", "level", "msg", "hostname", "name", "operation", "target", "component"]);

/** Fields that name the resource a line is about, most specific last wins … first found wins, in order. */
const TARGET_FIELDS = ["target", "vm", "volume", "network", "port", "store"] as const;

/** Longest attribute value kept (a stack trace is cut). */
const MAX_ATTRIBUTE = 2000;

/** One pino JSON line → a record (without its seq); undefined when it is not one. */
export function parseLogLine(line: string): Omit<LogRecord, "seq"> | undefined {
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  if (typeof j !== "object" || j === null) return undefined;
  const str = (v: unknown) => (typeof v === "string" ? v : "");
  let target = "";
  for (const f of TARGET_FIELDS) {
    const v = str(j[f]);
    if (/^[a-z]+s\/\S+/.test(v)) {
      target = v;
      break;
    }
  }
  const attributes: Record<string, string> = {};
  for (const [k, v] of Object.entries(j)) {
    // `pid` is the agent's own on every line, unless the line is about another process (a VMM).
    if (BASE.has(k) || v === undefined || (k === "pid" && v === process.pid)) continue;
    const text = typeof v === "string" ? v : JSON.stringify(v);
    attributes[k] = text.length > MAX_ATTRIBUTE ? `${text.slice(0, MAX_ATTRIBUTE)}…` : text;
  }
  const component =
    str(j.component) ||
    (j.method !== undefined
      ? "rpc"
      : target.startsWith("vms/")
        ? "vm"
        : target.startsWith("volumes/") || target.startsWith("stores/")
          ? "block"
          : target.startsWith("networks/")
            ? "network"
            : j.operation !== undefined
              ? "operations"
              : "agent");
  return {
    timeMs: typeof j.time === "number" ? j.time : Date.now(),
    level: severity(j.level),
    component,
    message: str(j.msg),
    operation: str(j.operation),
    target,
    attributes,
  };
}

/** What StreamLogs filters on. */
export interface LogFilter {
  minLevel: LogSeverity;
  operation?: string;
  target?: string;
}

export function matchesLog(r: LogRecord, f: LogFilter): boolean {
  return (
    SEVERITY_RANK[r.level] >= SEVERITY_RANK[f.minLevel] &&
    (!f.operation || r.operation === f.operation) &&
    (!f.target || r.target === f.target)
  );
}

/**
 * The agent's recent log lines, in memory: a pino destination (every line the logger writes also comes
 * here) that keeps the last `limit` lines and tells followers about new ones.
 */
export class LogRing extends EventEmitter<{ entry: [LogRecord] }> {
  readonly #entries: LogRecord[] = [];
  #seq = 0;
  #partial = "";

  constructor(private readonly limit = 5000) {
    super();
    this.setMaxListeners(0);
  }

  /** pino's destination interface: one or more complete JSON lines. */
  write(chunk: string): boolean {
    const text = this.#partial + chunk;
    const lines = text.split("\n");
    this.#partial = lines.pop() ?? "";
    for (const line of lines) {
      if (!line) continue;
      const r = parseLogLine(line);
      if (!r) continue;
      const entry: LogRecord = { seq: ++this.#seq, ...r };
      this.#entries.push(entry);
      if (this.#entries.length > this.limit) this.#entries.splice(0, this.#entries.length - this.limit);
      this.emit("entry", entry);
    }
    return true;
  }

  get seq(): number {
    return this.#seq;
  }

  /** The entries kept, oldest first. */
  entries(): readonly LogRecord[] {
    return this.#entries;
  }

  /**
   * The entries to replay, oldest first: with `sinceMs`, those at or after it (at most `last` of them
   * when `last` > 0), else the `last` latest ones.
   */
  replay(f: LogFilter, opts: { sinceMs?: number; last: number }): LogRecord[] {
    const hits = this.#entries.filter(
      (e) => matchesLog(e, f) && (opts.sinceMs === undefined || e.timeMs >= opts.sinceMs),
    );
    return opts.last > 0 ? hits.slice(-opts.last) : hits;
  }
}
