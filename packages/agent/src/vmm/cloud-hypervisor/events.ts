/**
 * cloud-hypervisor's event monitor (`--event-monitor path=<file>`): the VMM truncates the file when it
 * starts and appends one pretty-printed JSON object per event, each followed by a blank line:
 *
 * ```
 * {
 *   "timestamp": { "secs": 0, "nanos": 2150340 },
 *   "source": "vm",
 *   "event": "paused",
 *   "properties": null
 * }
 * ```
 *
 * Pure: parsing and what the events say about why the VMM ended. The driver tails the file.
 */
import type { ExitCause } from "../driver.js";

/** One event as the VMM wrote it. */
export interface ChEvent {
  /** `vmm`, `vm`, `guest`, `virtio-device`, `cpu_manager` … */
  source: string;
  /** `starting`, `booted`, `paused`, `resumed`, `rebooting`, `shutdown`, `deleted`, `panic` … */
  event: string;
  /** Time since the VMM started, in ms. */
  timeMs: number;
  properties: Record<string, string>;
}

/**
 * Splits what has been read so far into complete events and the unfinished rest (an event being
 * written). Text that is not a JSON object, and objects without `source` and `event`, are skipped.
 */
export function parseChEvents(text: string): { events: ChEvent[]; rest: string } {
  const events: ChEvent[] = [];
  let i = 0;
  for (;;) {
    const start = text.indexOf("{", i);
    if (start < 0) return { events, rest: "" };
    const end = objectEnd(text, start);
    if (end < 0) return { events, rest: text.slice(start) };
    i = end;
    let value: unknown;
    try {
      value = JSON.parse(text.slice(start, end));
    } catch {
      continue;
    }
    const event = toEvent(value);
    if (event !== undefined) events.push(event);
  }
}

/** Index just past the JSON object that opens at `start`, or -1 when it is not complete yet. */
function objectEnd(text: string, start: number): number {
  let depth = 0;
  let inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{") depth++;
    else if (c === "}" && --depth === 0) return i + 1;
  }
  return -1;
}

function toEvent(value: unknown): ChEvent | undefined {
  if (typeof value !== "object" || value === null) return undefined;
  const o = value as Record<string, unknown>;
  if (typeof o.source !== "string" || typeof o.event !== "string") return undefined;
  const ts = o.timestamp as { secs?: unknown; nanos?: unknown } | null | undefined;
  const secs = typeof ts?.secs === "number" ? ts.secs : 0;
  const nanos = typeof ts?.nanos === "number" ? ts.nanos : 0;
  const properties: Record<string, string> = {};
  if (typeof o.properties === "object" && o.properties !== null) {
    for (const [k, v] of Object.entries(o.properties)) if (typeof v === "string") properties[k] = v;
  }
  return { source: o.source, event: o.event, timeMs: secs * 1000 + nanos / 1e6, properties };
}

/**
 * Why the VMM ended, from what the driver itself asked and the events of this VMM's run.
 *
 * - The agent asked (`vmm.shutdown`, or a migration out): `host-request`.
 * - The guest reported a panic (pvpanic): `unknown`, a crash.
 * - The VMM shut itself down in order (`vmm`/`shutdown` last): `guest-shutdown`. cloud-hypervisor exits
 *   this way when the guest powers off or resets into shutdown, but also after an internal error, and when
 *   another client of its API sends `vmm.shutdown`: the events do not tell these apart.
 * - No such event (killed by a signal, crashed, or it died before the event was flushed — the event
 *   thread writes asynchronously and nobody waits for it at exit): `unknown`.
 */
export function exitCauseOf(events: readonly ChEvent[], hostRequested: boolean): ExitCause {
  if (hostRequested) return "host-request";
  // Only the last run counts, should the file hold more than one (it is truncated at start).
  const lastStart = events.findLastIndex((e) => e.source === "vmm" && e.event === "starting");
  const run = events.slice(Math.max(0, lastStart));
  if (run.some((e) => e.source === "guest" && e.event === "panic")) return "unknown";
  if (run.some((e) => e.source === "vmm" && e.event === "shutdown")) return "guest-shutdown";
  return "unknown";
}

/** The `RunningVmm` event, if any, that a VMM event stands for. */
export function vmmSignalOf(e: ChEvent): "reset" | "stop" | "resume" | undefined {
  if (e.source !== "vm") return undefined;
  switch (e.event) {
    case "rebooting":
      return "reset";
    case "paused":
      return "stop";
    case "resumed":
      return "resume";
    default:
      return undefined;
  }
}
