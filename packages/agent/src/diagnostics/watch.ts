import { VmenvError } from "@vmenv/rpc/errors";

/** A source of numbered changes that keeps its recent ones (for resume tokens). */
export interface ChangeSource<C extends { seq: number }> {
  subscribe(fn: (c: C) => void): () => void;
  /** Recent changes, oldest first. */
  history(): readonly C[];
  /** The latest change's seq. */
  seq(): number;
}

/** How many changes a watcher may fall behind before it is cut off. */
export const WATCH_QUEUE = 256;

/**
 * The Watch contract (design notes, "API conventions"), for any change source: without a resume token a
 * snapshot (`snapshot(seq)`), then every change after it; with one, the changes after it. A client that
 * falls `queueLimit` changes behind is cut off with RESOURCE_EXHAUSTED (WATCH_CLIENT_TOO_SLOW) instead of
 * the agent's memory growing; an unknown or expired token is OUT_OF_RANGE (RESUME_TOKEN_EXPIRED).
 * `toEvent` turns a change into what is sent (undefined: filtered out).
 */
export async function* watchChanges<C extends { seq: number }, E>(
  src: ChangeSource<C>,
  opts: {
    resumeToken: string;
    signal: AbortSignal;
    snapshot: (seq: number) => Iterable<E>;
    toEvent: (c: C) => E | undefined;
    queueLimit?: number;
  },
): AsyncGenerator<E> {
  const limit = opts.queueLimit ?? WATCH_QUEUE;
  // Subscribe first, so that nothing between the snapshot and the first change is lost.
  const queue: C[] = [];
  let wake: (() => void) | undefined;
  let overflow = false;
  const unsubscribe = src.subscribe((c) => {
    if (queue.length >= limit) overflow = true;
    else queue.push(c);
    wake?.();
  });
  const aborted = new Promise<void>((r) => opts.signal.addEventListener("abort", () => r(), { once: true }));
  try {
    let last = src.seq();
    if (opts.resumeToken) {
      const from = Number(opts.resumeToken);
      const oldest = src.history()[0]?.seq ?? src.seq() + 1;
      if (
        !Number.isInteger(from) ||
        from < 0 ||
        from > src.seq() ||
        (from < oldest - 1 && from !== src.seq())
      ) {
        throw new VmenvError("out-of-range", "resume token is unknown or too old; watch again without one", {
          reason: "RESUME_TOKEN_EXPIRED",
        });
      }
      queue.unshift(...src.history().filter((c) => c.seq > from && !queue.includes(c)));
      last = from;
    } else {
      yield* opts.snapshot(last);
    }
    for (;;) {
      if (overflow) {
        throw new VmenvError(
          "resource-exhausted",
          "watcher fell too far behind and was cut off; watch again",
          {
            reason: "WATCH_CLIENT_TOO_SLOW",
          },
        );
      }
      const c = queue.shift();
      if (!c) {
        if (opts.signal.aborted) return;
        await Promise.race([new Promise<void>((r) => (wake = r)), aborted]);
        continue;
      }
      if (c.seq <= last) continue;
      last = c.seq;
      const e = opts.toEvent(c);
      if (e !== undefined) yield e;
    }
  } finally {
    unsubscribe();
  }
}
