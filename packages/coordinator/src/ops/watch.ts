import { randomBytes } from "node:crypto";
import { boundedWatch, VmenvError } from "@vmenv/rpc";
import type { OperationEngine } from "./engine.js";
import type { OpRecord } from "./types.js";

/** One change of an operation as watchers see it. */
export interface OpChange {
  seq: number;
  type: "created" | "updated";
  op: OpRecord;
  timeMs: number;
}

/** How many changes a watcher may fall behind before it is cut off. */
export const WATCH_QUEUE = 512;
/** Changes remembered for resume tokens. */
export const WATCH_HISTORY = 4096;

/**
 * The engine's changes, numbered, with the recent ones kept for resume tokens. A token is
 * `{epoch}.{seq}`: the epoch changes with every coordinator start, so a token from before a restart is
 * refused (OUT_OF_RANGE RESUME_TOKEN_EXPIRED) rather than misread.
 */
export class OpChangeLog {
  readonly epoch = randomBytes(4).toString("hex");
  readonly #history: OpChange[] = [];
  readonly #subs = new Set<(c: OpChange) => void>();
  /** Ids announced as created recently (an operation's first record can be emitted twice). */
  readonly #created = new Set<string>();
  #seq = 0;
  readonly #detach: () => void;

  constructor(engine: OperationEngine, now: () => number = Date.now) {
    const onChange = (op: OpRecord) => {
      const fresh =
        op.state === "pending" && op.resumeCount === 0 && op.updateMs === op.createMs && !op.cancelRequested;
      const created = fresh && !this.#created.has(op.id);
      if (created) {
        this.#created.add(op.id);
        if (this.#created.size > WATCH_HISTORY)
          this.#created.delete(this.#created.values().next().value as string);
      }
      const c: OpChange = { seq: ++this.#seq, type: created ? "created" : "updated", op, timeMs: now() };
      this.#history.push(c);
      if (this.#history.length > WATCH_HISTORY) this.#history.shift();
      for (const s of this.#subs) s(c);
    };
    engine.on("changed", onChange);
    this.#detach = () => engine.off("changed", onChange);
  }

  close(): void {
    this.#detach();
  }

  seq(): number {
    return this.#seq;
  }

  token(seq: number): string {
    return `${this.epoch}.${seq}`;
  }

  subscribe(fn: (c: OpChange) => void): () => void {
    this.#subs.add(fn);
    return () => this.#subs.delete(fn);
  }

  /** The changes after the token's, or OUT_OF_RANGE when the token is not one this log can continue. */
  since(token: string): OpChange[] {
    const m = /^([0-9a-f]+)\.(\d+)$/.exec(token);
    const seq = Number(m?.[2]);
    const oldest = this.#history[0]?.seq ?? this.#seq + 1;
    if (!m || m[1] !== this.epoch || seq > this.#seq || seq < oldest - 1)
      throw new VmenvError(
        "out-of-range",
        "resume token is unknown or too old (the coordinator restarted, or the watch fell far behind); watch again without one",
        { reason: "RESUME_TOKEN_EXPIRED" },
      );
    return this.#history.filter((c) => c.seq > seq);
  }
}

export type WatchItem =
  | { kind: "initial"; op: OpRecord; seq: number }
  | { kind: "synced"; seq: number }
  | ({ kind: "change" } & OpChange);

/**
 * The Watch contract for operations: without a token, `snapshot()` then every matching change after
 * it; with one, SYNCED then the changes after it. `match` is called once per change, in order (it may
 * keep state, e.g. the descendants of a root). A watcher that falls `queueLimit` matching changes behind
 * is cut off with RESOURCE_EXHAUSTED (WATCH_CLIENT_TOO_SLOW).
 */
export function watchOps(
  log: OpChangeLog,
  opts: {
    resumeToken: string;
    signal: AbortSignal;
    snapshot: () => Promise<OpRecord[]>;
    match: (op: OpRecord) => boolean;
    queueLimit?: number;
  },
): AsyncGenerator<WatchItem> {
  return boundedWatch<OpChange, WatchItem>({
    subscribe: (push) => log.subscribe(push),
    signal: opts.signal,
    queueLimit: opts.queueLimit ?? WATCH_QUEUE,
    accept: (c) => opts.match(c.op),
    // Changes missed since the token (read in the same tick as the subscription: none slips between).
    start: () =>
      opts.resumeToken ? { after: 0, missed: log.since(opts.resumeToken) } : { after: log.seq() },
    head: async function* (last) {
      if (opts.resumeToken) {
        // SYNCED carries the token given: resuming from it again replays the same changes, loses none.
        yield { kind: "synced", seq: Number(opts.resumeToken.split(".")[1]) };
      } else {
        for (const op of await opts.snapshot()) yield { kind: "initial", op, seq: last };
        yield { kind: "synced", seq: last };
      }
    },
    toEvent: (c) => ({ kind: "change", ...c }),
  });
}
