import { VmenvError } from "@vmenv/rpc/errors";
import type { OperationRecord } from "./operations.js";

/** One failure the agent met, mapped to the resource (and element) it concerns. */
export interface ErrorEntry {
  id: string;
  timeMs: number;
  /** UPPER_SNAKE type: the error's reason, "INTERNAL" for unexpected ones. */
  reason: string;
  /** What happened and what to do about it. */
  message: string;
  /** `vms/web-1`, … */
  target: string;
  /** The element of the target, e.g. a device id; "" when none. */
  element: string;
  /** `operations/{id}`, or "" for errors outside an operation (a crash). */
  operation: string;
  /** The error itself, for its full status. */
  error: Error;
}

/** What ListErrors filters on (all combine with AND). */
export interface ErrorFilter {
  startMs?: number;
  endMs?: number;
  reasons?: readonly string[];
  target?: string;
  operation?: string;
}

/** Metadata keys that name an element of the target, most specific first. */
const ELEMENT_KEYS = ["device", "element", "disk", "nic", "gpu", "snapshot", "field"];

/** The element a domain error names, if any. */
export function elementOf(err: Error): string {
  if (!(err instanceof VmenvError)) return "";
  for (const k of ELEMENT_KEYS) {
    const v = err.metadata[k];
    if (v) return v;
  }
  return err.fieldViolations[0]?.field ?? "";
}

/**
 * A bounded, queryable record of the agent's failures: the last `limit`, newest last. Fed by failed
 * operations and by VM crashes.
 */
export class ErrorLog {
  readonly #entries: ErrorEntry[] = [];
  #seq = 0;

  constructor(
    private readonly now: () => number = Date.now,
    private readonly limit = 1000,
  ) {}

  record(e: Omit<ErrorEntry, "id" | "timeMs"> & { timeMs?: number }): ErrorEntry {
    const timeMs = e.timeMs ?? this.now();
    const entry: ErrorEntry = { ...e, timeMs, id: `${timeMs.toString(36)}-${(++this.#seq).toString(36)}` };
    this.#entries.push(entry);
    if (this.#entries.length > this.limit) this.#entries.splice(0, this.#entries.length - this.limit);
    return entry;
  }

  /** A failed operation: its reason and message when it is a domain error, a pointer to the log when not. */
  recordOperation(op: OperationRecord, err: Error): ErrorEntry {
    const operation = `operations/${op.id}`;
    const known = err instanceof VmenvError;
    return this.record({
      timeMs: op.endTimeMs ?? this.now(),
      reason: known ? err.reason : "INTERNAL",
      message: known
        ? `${op.kind} of ${op.target} failed: ${err.message}`
        : `${op.kind} of ${op.target} failed with an internal error; its cause is in the agent log ` +
          `(vmenv logs --operation ${operation} --level debug)`,
      target: op.target,
      element: elementOf(err),
      operation,
      error: err,
    });
  }

  /** Matching entries, newest first. */
  list(f: ErrorFilter = {}): ErrorEntry[] {
    const reasons = f.reasons && f.reasons.length > 0 ? new Set(f.reasons) : undefined;
    return this.#entries
      .filter(
        (e) =>
          (f.startMs === undefined || e.timeMs >= f.startMs) &&
          (f.endMs === undefined || e.timeMs < f.endMs) &&
          (!reasons || reasons.has(e.reason)) &&
          (!f.target || e.target === f.target) &&
          (!f.operation || e.operation === f.operation),
      )
      .reverse();
  }
}
