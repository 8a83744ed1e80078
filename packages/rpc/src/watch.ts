import { VmenvError } from "./errors.js";

/** Where a watch's changes start: the changes numbered after `after`, beginning with `missed`. */
export interface WatchStart<C> {
  /** The seq after which changes are sent; changes numbered up to it are dropped. */
  after: number;
  /** Changes from before the subscription to send first, oldest first (resuming from a token). */
  missed?: readonly C[];
}

/**
 * The loop under every Watch stream: a queue fed by `subscribe`, drained in order, skipping changes
 * numbered at or before the last sent; it waits for the next change or the call's abort, and ends when
 * aborted with nothing queued. A watcher that falls `queueLimit` queued changes behind is cut off with
 * RESOURCE_EXHAUSTED (WATCH_CLIENT_TOO_SLOW) instead of the server's memory growing.
 *
 * In order: subscribes (so nothing between the head and the first change is lost), calls `start` (it may
 * throw, e.g. for an expired resume token), sends `head(after)` (a snapshot, SYNCED), then the changes.
 * `accept` keeps changes out of the queue (they do not count towards the limit); it is called once per
 * change, in order, missed ones first. `toEvent` turns a change into what is sent (undefined: nothing).
 */
export async function* boundedWatch<C extends { seq: number }, E>(opts: {
  subscribe: (push: (c: C) => void) => () => void;
  signal: AbortSignal;
  queueLimit: number;
  start: () => WatchStart<C>;
  head?: (after: number) => Iterable<E> | AsyncIterable<E>;
  accept?: (c: C) => boolean;
  toEvent: (c: C) => E | undefined;
}): AsyncGenerator<E> {
  const queue: C[] = [];
  let wake: (() => void) | undefined;
  let overflow = false;
  const unsubscribe = opts.subscribe((c) => {
    if (opts.accept && !opts.accept(c)) return;
    if (queue.length >= opts.queueLimit) overflow = true;
    else queue.push(c);
    wake?.();
  });
  const aborted = new Promise<void>((r) => opts.signal.addEventListener("abort", () => r(), { once: true }));
  try {
    const { after, missed = [] } = opts.start();
    queue.unshift(...missed.filter((c) => !queue.includes(c) && (!opts.accept || opts.accept(c))));
    let last = after;
    if (opts.head) yield* opts.head(after);
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
